"""The demo base's language pre-training and the vision tower it starts from.

The tiny PaliGemma's tower, trained from the first step of the language pre-training, lost the
lesion's side before its decoder learnt to read it, and no LoRA stage then learnt "is the
abnormality in the left lung?". Its family holds the tower still (``tiny_vision_frozen_share``);
the LLaVA base keeps training its tower from the first step, as before.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from medvlm.demo.base import TinyConfig, phantom_corpus
from medvlm.demo.pretrain import pretrain, vision_lr_factor
from medvlm.models.families import get_family
from medvlm.models.tiny import build_tiny, tiny_tokenizer


def _towers(model, family) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "language": {}}
    for name, p in model.named_parameters():
        out["vision" if family.tower_of(name) in ("vision", "projector") else "language"][name] = p.detach().clone()
    return out


def _moved(before: dict[str, torch.Tensor], model) -> int:
    params = dict(model.named_parameters())
    return sum(not torch.equal(params[name].detach(), value) for name, value in before.items())


@pytest.mark.parametrize("family_name, tower_moves", [("paligemma", False), ("llava", True)])
def test_language_pretraining_holds_the_vision_tower_as_the_family_says(family_name, tower_moves, small_phantom,
                                                                         tmp_path):
    family = get_family(family_name)
    cfg = TinyConfig(family=family_name, phantom=small_phantom, **TINY, pretrain_steps=3, pretrain_batch_size=4)
    assert cfg.vision_frozen_share == family.tiny_vision_frozen_share == (0.0 if tower_moves else 1.0)
    tok = tiny_tokenizer(family_name, phantom_corpus(small_phantom), cfg.vocab_size)
    model, processor = build_tiny(family_name, cfg.sizes(), tok)
    before = _towers(model, family)

    pretrain(model, processor, cfg, tmp_path / "work")

    assert _moved(before["language"], model) == len(before["language"])  # the decoder learns in both
    vision_moved = _moved(before["vision"], model)
    # LLaVA: the tower trains (all but the parts its projector never reads, e.g. CLIP's post-norm)
    assert vision_moved > len(before["vision"]) // 2 if tower_moves else vision_moved == 0


def test_vision_factor_is_zero_for_the_frozen_share_then_follows_the_cosine():
    cfg = TinyConfig(family="llava", pretrain_steps=100, vision_frozen_share=0.5)
    assert [vision_lr_factor(s, cfg) for s in (0, 10, 49)] == [0.0, 0.0, 0.0]
    assert vision_lr_factor(50, cfg) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 45 / 95)).item()))
    assert vision_lr_factor(99, cfg) < vision_lr_factor(60, cfg) < 1.0
    assert TinyConfig(family="llava", vision_frozen_share=0.5).key() != TinyConfig(family="llava").key()
    with pytest.raises(ValueError, match="vision_frozen_share must be in \\[0, 1\\], got 1.5"):
        TinyConfig(family="llava", vision_frozen_share=1.5)


def test_vision_pretraining_steps_come_from_the_family_unless_set():
    """A family whose tower is dearer per step takes fewer steps (the demo is timed end to end); the
    others keep 3,000, and their cached bases keep their key (the resolved value is what is hashed)."""
    for name in ("llava", "paligemma", "medgemma", "qwen2_5_vl"):
        assert TinyConfig(family=name).vision_pretrain_steps == get_family(name).tiny_vision_pretrain_steps
    assert TinyConfig(family="llava").key() == TinyConfig(family="llava", vision_pretrain_steps=3000).key()
    assert TinyConfig(family="medgemma").vision_pretrain_steps == 1500
    assert TinyConfig(family="medgemma", vision_pretrain_steps=10).vision_pretrain_steps == 10
