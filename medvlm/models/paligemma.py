"""PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP → linear projector → Gemma.

HF module tree (transformers 5)::

    PaliGemmaForConditionalGeneration
    ├── model                         PaliGemmaModel
    │   ├── vision_tower              SiglipVisionModel  (encoder.layers.N.self_attn.{q,k,v,out}_proj, mlp.fc1/fc2)
    │   ├── multi_modal_projector     .linear
    │   └── language_model           GemmaModel (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, norm)
    └── lm_head

Inputs are built by the processor itself: ``suffix=`` gives ``token_type_ids`` (0 on image and
prompt, which PaliGemma attends to bidirectionally as a prefix-LM; 1 on the answer) and the EOS.
An image is ``(image_size / patch_size)²`` tokens (1,024 for the 448-pixel checkpoints), one per
SigLIP patch, in row-major order.
"""

from __future__ import annotations

from transformers import (
    BatchFeature,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from medvlm.models.base import IGNORE_INDEX, ModelFamily, TinySizes


class PaliGemmaFamily(ModelFamily):
    name = "paligemma"
    model_class = PaliGemmaForConditionalGeneration
    model_types = ("paligemma",)
    #: public config.json values of the real checkpoints (widths, heads, vocabulary, image grid), for
    #: depth-cut test models (:meth:`real_shape_model`)
    real_shapes = {
        "paligemma-3b-mix-448": {
            "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=448, patch_size=14),
            "text": dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=256, vocab_size=257216),
        },
    }
    #: PaliGemma's task prefix for question answering (big_vision convention)
    prompt_template = "answer en {question}"
    #: The tiny base's vision tower is held still during its language pre-training. PaliGemma's own
    #: Stage 1 protects its pre-trained SigLIP "from bad gradients coming from the LLM" with a slow
    #: warm-up of the image encoder's learning rate (Beyer et al. 2024, "PaliGemma: A versatile 3B VLM
    #: for transfer", arXiv:2407.07726, Stage 1). Trained from the first step, the tiny tower lost
    #: the lesion's side (lesion-token left-right separation 0.69 → 0.26 of the feature norm) before
    #: the Gemma decoder learnt to read it: the base named the side in captions at chance, and its
    #: "left"/"right" embeddings merged (cosine 0.97), so no LoRA stage learnt "is it in the left lung?".
    tiny_vision_frozen_share = 1.0

    def _prompts(self, processor, questions: list[str]) -> list[str]:
        return [processor.image_token + self.prompt_template.format(question=q) for q in questions]

    def train_batch(self, processor, images, questions, answers, *, prepared: bool = False) -> BatchFeature:
        batch = processor(images=images, text=self._prompts(processor, questions), suffix=answers,
                          padding="longest", padding_side="right", return_tensors="pt",
                          **self.processor_kwargs(prepared))
        labels = batch["input_ids"].clone()
        labels[batch["token_type_ids"] == 0] = IGNORE_INDEX  # image tokens, <bos>, prompt, "\n"
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX  # padding
        batch["labels"] = labels
        return batch

    def generation_batch(self, processor, images, questions, *, prepared: bool = False) -> BatchFeature:
        batch = processor(images=images, text=self._prompts(processor, questions), padding="longest",
                          padding_side="left", return_tensors="pt", **self.processor_kwargs(prepared))
        batch.pop("labels", None)  # the processor adds all-ignored labels; generate must not see them
        return batch

    def real_shape_model(self, name: str, tokenizer, layers: int = 2):
        """A model with the real checkpoint ``name``'s widths, heads, vocabulary and image size, its
        towers cut to ``layers`` layers, random weights (the real-shape test tier)."""
        shape = self.real_shapes[name]
        vision = SiglipVisionConfig(**{**shape["vision"], "num_hidden_layers": layers}, vision_use_head=False)
        image_processor = SiglipImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size},
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
        image_processor.image_seq_length = (vision.image_size // vision.patch_size) ** 2
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        text = GemmaConfig(**{**shape["text"], "num_hidden_layers": layers}, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                                 vocab_size=text.vocab_size, projection_dim=text.hidden_size,
                                 hidden_size=text.hidden_size)
        return PaliGemmaForConditionalGeneration(config), processor

    def tiny_model(self, sizes: TinySizes, tokenizer):
        size = {"height": sizes.image_size, "width": sizes.image_size}
        image_processor = SiglipImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        image_processor.image_seq_length = (sizes.image_size // sizes.patch_size) ** 2
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        vocab = len(processor.tokenizer)
        vision = SiglipVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
                                    num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                                    image_size=sizes.image_size, patch_size=sizes.patch_size, vision_use_head=False)
        text = GemmaConfig(hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
                           num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
                           num_key_value_heads=sizes.text_heads, head_dim=sizes.text_hidden // sizes.text_heads,
                           vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                                 vocab_size=vocab, projection_dim=sizes.text_hidden, hidden_size=sizes.text_hidden)
        return PaliGemmaForConditionalGeneration(config), processor
