"""The training collator: a small dataclass around the family's ``train_batch``."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import ProcessorMixin

from medvlm.models.base import ModelFamily

#: Pre-resized images: the processor only rescales and normalises (see training/data.py).
NO_RESIZE = {"do_resize": False, "do_center_crop": False}


@dataclass
class VLMCollator:
    """Examples → model inputs with labels.

    Keys in: ``image`` (uint8 HxWx3, already at the model's resolution), ``question``, ``answer``.
    Keys out: ``input_ids``, ``attention_mask``, ``pixel_values``, ``labels`` (and
    ``token_type_ids`` for PaliGemma); padding to the longest in the batch.
    """

    family: ModelFamily
    processor: ProcessorMixin

    def __call__(self, examples: list[dict]) -> dict:
        expected = {"image", "question", "answer"}
        if not examples or not expected <= set(examples[0]):
            found = sorted(examples[0]) if examples else []
            raise KeyError(f"VLMCollator expects keys {sorted(expected)}, found {found}")
        batch = self.family.train_batch(
            self.processor,
            [e["image"] for e in examples],
            [e["question"] for e in examples],
            [e["answer"] for e in examples],
            **NO_RESIZE,
        )
        return dict(batch)
