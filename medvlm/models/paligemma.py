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
"""

from __future__ import annotations

from transformers import BatchFeature, PaliGemmaForConditionalGeneration, ProcessorMixin

from medvlm.models.base import IGNORE_INDEX, ModelFamily


class PaliGemmaFamily(ModelFamily):
    name = "paligemma"
    model_class = PaliGemmaForConditionalGeneration
    #: PaliGemma's task prefix for question answering (big_vision convention)
    prompt_template = "answer en {question}"

    def _prompts(self, processor: ProcessorMixin, questions: list[str]) -> list[str]:
        return [processor.image_token + self.prompt_template.format(question=q) for q in questions]

    def train_batch(self, processor, images, questions, answers, **kwargs) -> BatchFeature:
        processor.tokenizer.padding_side = "right"
        batch = processor(images=images, text=self._prompts(processor, questions), suffix=answers,
                          padding="longest", return_tensors="pt", **kwargs)
        labels = batch["input_ids"].clone()
        labels[batch["token_type_ids"] == 0] = IGNORE_INDEX  # image tokens, <bos>, prompt, "\n"
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX  # padding
        batch["labels"] = labels
        return batch

    def generation_batch(self, processor, images, questions, **kwargs) -> BatchFeature:
        processor.tokenizer.padding_side = "left"
        try:
            batch = processor(images=images, text=self._prompts(processor, questions), padding="longest",
                              return_tensors="pt", **kwargs)
            batch.pop("labels", None)  # the processor adds all-ignored labels; generate must not see them
            return batch
        finally:
            processor.tokenizer.padding_side = "right"
