"""LLaVA-style models (``LlavaForConditionalGeneration``): CLIP/SigLIP → MLP projector → Llama-like LM.

HF module tree (transformers 5)::

    LlavaForConditionalGeneration
    ├── model                         LlavaModel
    │   ├── vision_tower              CLIPVisionModel (encoder.layers.N.self_attn.{q,k,v,out}_proj, mlp.fc1/fc2)
    │   ├── multi_modal_projector     linear_1 → act → linear_2
    │   └── language_model           LlamaModel / MistralModel (layers.N.self_attn.{q,k,v,o}_proj, mlp.*, norm)
    └── lm_head

Inputs come from the processor's chat template; the loss is on the assistant answer only: the
prompt (rendered with ``add_generation_prompt=True``) is a text prefix of the full conversation,
so its token count is where the labels start. That is checked per example, not assumed.

The projector reads the vision tower's ``vision_feature_layer`` (LLaVA-1.5: −2, the penultimate
layer) without the class token (``vision_feature_select_strategy: default``): Grad-CAM hooks that
layer, not the last one, whose output the projector never sees.
"""

from __future__ import annotations

from transformers import (
    BatchFeature,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from medvlm.models.base import IGNORE_INDEX, ModelFamily, TinySizes

#: A LLaVA-1.5-style template ("USER: <image>\n... ASSISTANT: ...") whose assistant turn starts at
#: a token boundary, so the prompt is a token prefix of the full conversation (the tiny model's).
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
    "{% else %}ASSISTANT:{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}"
    "{% endif %}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaFamily(ModelFamily):
    name = "llava"
    model_class = LlavaForConditionalGeneration
    model_types = ("llava",)
    #: public config.json values of the real checkpoints, for depth-cut test models (:meth:`real_shape_model`)
    real_shapes = {
        "llava-1.5-7b-hf": {
            "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768),
            "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
            "projector": dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                              projector_hidden_act="gelu"),
        },
    }

    def _prompt_texts(self, processor, questions):
        return [processor.apply_chat_template(self._conversation(q), add_generation_prompt=True,
                                              tokenize=False) for q in questions]

    def train_batch(self, processor, images, questions, answers, *, prepared: bool = False) -> BatchFeature:
        tok = processor.tokenizer
        full = [processor.apply_chat_template(self._conversation(q, a), tokenize=False)
                for q, a in zip(questions, answers)]
        eos = tok.eos_token or ""
        full = [t if t.rstrip().endswith(eos) else t + eos for t in full]
        batch = processor(images=images, text=full, padding="longest", padding_side="right", return_tensors="pt",
                          **self.processor_kwargs(prepared))
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        image_id = processor.image_token_id
        expanded = [prompt.replace(processor.image_token, processor.image_token * int((ids == image_id).sum()), 1)
                    for prompt, ids in zip(self._prompt_texts(processor, questions), batch["input_ids"])]
        for i, prompt_ids in enumerate(tok(expanded, add_special_tokens=True)["input_ids"]):
            n = len(prompt_ids)
            if batch["input_ids"][i, :n].tolist() != prompt_ids:
                raise ValueError(
                    "the chat template's generation prompt is not a token prefix of the full "
                    f"conversation for example {i} ({expanded[i][:80]!r}...); the answer mask cannot be placed. "
                    "Use a template whose assistant turn starts at a token boundary."
                )
            labels[i, :n] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    def generation_batch(self, processor, images, questions, *, prepared: bool = False) -> BatchFeature:
        return processor(images=images, text=self._prompt_texts(processor, questions), padding="longest",
                         padding_side="left", return_tensors="pt", **self.processor_kwargs(prepared))

    def vision_feature_layer(self, model) -> int:
        """The config's ``vision_feature_layer`` as an index into the encoder layers: hidden state
        k (0 = the embeddings) is the output of layer k − 1, and negative k counts from the end."""
        k = getattr(model.config, "vision_feature_layer", -1)
        if isinstance(k, (list, tuple)):  # several layers concatenated: the deepest one read
            k = max(k, key=lambda x: x % (len(self.vision_layers(model)) + 1))
        k = int(k)
        if k == 0:
            raise ValueError("vision_feature_layer 0 reads the patch embeddings, not an encoder layer; "
                             "Grad-CAM needs a layer output")
        return k if k < 0 else k - 1

    def real_shape_model(self, name: str, tokenizer, layers: int = 2):
        """A model with the real checkpoint ``name``'s widths, heads, vocabulary, image size and
        projector reading (``vision_feature_layer: -2``, no class token), its towers cut to ``layers``
        layers (3 for the vision tower, so that the penultimate layer is not the first), random weights."""
        shape = self.real_shapes[name]
        vision = CLIPVisionConfig(**{**shape["vision"], "num_hidden_layers": max(layers, 3)})
        size = {"height": vision.image_size, "width": vision.image_size}
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": vision.image_size}, crop_size=size,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
        text = LlamaConfig(**{**shape["text"], "num_hidden_layers": layers}, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                             **shape["projector"])
        return LlavaForConditionalGeneration(config), processor

    def tiny_model(self, sizes: TinySizes, tokenizer):
        size = {"height": sizes.image_size, "width": sizes.image_size}
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": sizes.image_size}, crop_size=size,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=sizes.patch_size, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
        vocab = len(tokenizer)
        vision = CLIPVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
                                  num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                                  image_size=sizes.image_size, patch_size=sizes.patch_size,
                                  projection_dim=sizes.vision_hidden)
        text = LlamaConfig(hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
                           num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
                           num_key_value_heads=sizes.text_heads, vocab_size=vocab,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id, max_position_embeddings=512)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             projector_hidden_act="gelu")
        return LlavaForConditionalGeneration(config), processor
