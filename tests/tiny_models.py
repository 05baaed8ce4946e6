"""Tiny random models with eager attention for the diagnostics tests (built per test module, so a test
that changes a model cannot leak into another module)."""

from __future__ import annotations

from medvlm.models.base import TinySizes
from medvlm.models.registry import FAMILIES as REGISTERED
from medvlm.models.registry import get_family
from medvlm.models.tiny import build_tiny, tiny_tokenizer

CORPUS = ["where is the lesion? the abnormality is in the left lung, near the liver and the kidney."] * 4
FAMILIES = list(REGISTERED)


def eager_tiny(family: str, corpus: list[str] = CORPUS):
    """``(model in eval mode, processor, family adapter)``: 2+2 layers, 64-pixel images, an 8x8 patch grid."""
    tok = tiny_tokenizer(family, corpus, 300)
    model, processor = build_tiny(family, TinySizes(vision_layers=2, text_layers=2, patch_size=8), tok)
    model.set_attn_implementation("eager")
    return model.eval(), processor, get_family(family)
