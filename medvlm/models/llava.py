"""LLaVA-style models (``LlavaForConditionalGeneration``): CLIP/SigLIP → MLP projector → Llama-like LM.

HF module tree (transformers 5)::

    LlavaForConditionalGeneration
    ├── model                         LlavaModel
    │   ├── vision_tower              CLIPVisionModel (vision_model.encoder.layers.N.self_attn.{q,k,v,out}_proj, mlp.fc1/fc2)
    │   ├── multi_modal_projector     linear_1 → act → linear_2
    │   └── language_model           LlamaModel / MistralModel (layers.N.self_attn.{q,k,v,o}_proj, mlp.*, norm)
    └── lm_head

Inputs come from the processor's chat template; the loss is on the assistant answer only: the
prompt (rendered with ``add_generation_prompt=True``) is a text prefix of the full conversation,
so its token count is where the labels start. That is checked per example, not assumed.
"""

from __future__ import annotations

from transformers import BatchFeature, LlavaForConditionalGeneration

from medvlm.models.base import IGNORE_INDEX, ModelFamily


class LlavaFamily(ModelFamily):
    name = "llava"
    model_class = LlavaForConditionalGeneration

    @staticmethod
    def _conversation(question: str, answer: str | None = None) -> list[dict]:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is not None:
            conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return conv

    def _prompt_texts(self, processor, questions):
        return [processor.apply_chat_template(self._conversation(q), add_generation_prompt=True,
                                              tokenize=False) for q in questions]

    def train_batch(self, processor, images, questions, answers, **kwargs) -> BatchFeature:
        tok = processor.tokenizer
        tok.padding_side = "right"
        full = [processor.apply_chat_template(self._conversation(q, a), tokenize=False)
                for q, a in zip(questions, answers)]
        eos = tok.eos_token or ""
        full = [t if t.rstrip().endswith(eos) else t + eos for t in full]
        batch = processor(images=images, text=full, padding="longest", return_tensors="pt", **kwargs)
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

    def generation_batch(self, processor, images, questions, **kwargs) -> BatchFeature:
        processor.tokenizer.padding_side = "left"
        try:
            return processor(images=images, text=self._prompt_texts(processor, questions),
                             padding="longest", return_tensors="pt", **kwargs)
        finally:
            processor.tokenizer.padding_side = "right"
