"""QLoRA: the tiny model of every family loads in 4-bit and 8-bit through bitsandbytes (CPU backend) and trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlm.models import FAMILIES, load_model_and_processor
from medvlm.training.arguments import LoraArguments
from medvlm.training.lora import attach_lora

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_base_trains_its_lora_adapter(tiny_folders, family, bits):
    loaded = load_model_and_processor(str(tiny_folders(family)), quantization_bits=bits)
    linear_types = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in linear_types
    model = attach_lora(loaded.model, loaded.family, LoraArguments(lora_towers=["language"]), "x",
                        quantized=True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    images = loaded.family.prepare_images(loaded.processor, [np.full((64, 64, 3), v, np.uint8) for v in (20, 220)])
    batch = loaded.family.train_batch(loaded.processor, images, ["Is there a lesion?"] * 2, ["yes", "no"], prepared=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(moved) == len(trainable), "every LoRA parameter must change after training steps"
