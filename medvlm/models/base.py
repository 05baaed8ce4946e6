"""The model-family seam: everything model-specific sits behind :class:`ModelFamily`.

Training, eval and diagnostics call these methods and never branch on the family. Adding a
family (MedGemma, Qwen2-VL ...) means one new file that subclasses ``ModelFamily`` and one line
in :mod:`medvlm.models.registry`.

Canonical parts (names used across medvlm), each a dotted path in the HF module tree::

    vision_tower      the image encoder (SigLIP / CLIP)            [batch, patches, d_vision]
    projector         image features → language embedding space    [batch, patches, d_model]
    language_model    the decoder stack (embed_tokens, layers, norm)
    lm_head           the unembedding                               [batch, pos, vocab]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

IGNORE_INDEX = -100

#: LoRA target names per tower, per preset. "paper" reproduces the seed paper's list (q, k, v, o,
#: up, down projections on both towers): on SigLIP/CLIP only q/k/v match, since their attention
#: output is ``out_proj`` and their MLP is ``fc1``/``fc2``. "full" adds those so the vision tower is
#: covered fully, and the projector's linear layers.
LORA_PRESETS: dict[str, dict[str, Any]] = {
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
TOWERS = ("vision", "projector", "language")


@dataclass
class ImageSpan:
    """Where the image tokens sit in one sequence, and their grid (rows, cols)."""

    start: int
    end: int  # exclusive
    grid: tuple[int, int]


class ModelFamily:
    """One family of vision-language models (PaliGemma, LLaVA ...)."""

    name: str = ""
    model_class: type[PreTrainedModel]
    #: dotted module paths of the canonical parts (see module docstring)
    parts: dict[str, str] = {
        "vision_tower": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language_model": "model.language_model",
        "lm_head": "lm_head",
    }

    # -- inputs ---------------------------------------------------------------------------------
    def train_batch(self, processor: ProcessorMixin, images: list, questions: list[str],
                    answers: list[str], **kwargs) -> BatchFeature:
        """Tokenised training batch with ``labels`` (IGNORE_INDEX on image, prompt, padding)."""
        raise NotImplementedError

    def generation_batch(self, processor: ProcessorMixin, images: list, questions: list[str],
                         **kwargs) -> BatchFeature:
        """Left-padded generation batch ending where the answer starts."""
        raise NotImplementedError

    # -- structure ------------------------------------------------------------------------------
    def get_part(self, model: torch.nn.Module, part: str) -> torch.nn.Module:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        obj = base
        for attr in self.parts[part].split("."):
            obj = getattr(obj, attr)
        return obj

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.get_part(model, "language_model").layers

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.get_part(model, "language_model").norm

    def unembed(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.get_part(model, "lm_head")

    def image_token_id(self, model: torch.nn.Module) -> int:
        cfg = model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    def image_grid(self, model: torch.nn.Module) -> tuple[int, int]:
        """Patch grid of one image, from the vision config (not a hard-coded 24x24)."""
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def image_span(self, model: torch.nn.Module, input_ids: torch.Tensor) -> ImageSpan:
        """Image-token span in one sequence (1-D ids), checked against the grid."""
        pos = (input_ids == self.image_token_id(model)).nonzero().flatten()
        if pos.numel() == 0:
            raise ValueError("the sequence holds no image tokens; pass the image through the processor")
        start, end = int(pos[0]), int(pos[-1]) + 1
        rows, cols = self.image_grid(model)
        if end - start != rows * cols or pos.numel() != rows * cols:
            raise ValueError(f"found {pos.numel()} image tokens at {start}..{end}, expected a contiguous "
                             f"{rows}x{cols} grid from the vision config")
        return ImageSpan(start, end, (rows, cols))

    # -- LoRA -----------------------------------------------------------------------------------
    def lora_target_regex(self, towers: list[str] | tuple[str, ...], names: dict[str, list[str]]) -> str:
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

    def tower_of(self, param_name: str) -> str:
        """Which tower a parameter belongs to (for per-tower trainable counts)."""
        for tower, part in (("vision", "vision_tower"), ("projector", "projector"),
                            ("language", "language_model"), ("lm_head", "lm_head")):
            if f"{self.parts[part]}." in param_name or param_name.startswith(self.parts[part]):
                return tower
        return "other"
