"""A model folder with the demo's architecture (random weights: no pre-training, so fast) and two
LoRA adapters with different random weights, for the explorer tests."""

from __future__ import annotations

from pathlib import Path

import torch


def build_model_with_adapters(root: Path, family: str, phantom_cfg) -> tuple[Path, list[Path]]:
    """``(model folder, [adapter A, adapter B])``; the adapters' LoRA B matrices are non-zero, so A,
    B and the base model give different outputs."""
    from peft import LoraConfig, get_peft_model

    from medvlm.demo.base import TinyConfig, phantom_corpus
    from medvlm.models.registry import get_family, load_model_and_processor
    from medvlm.models.tiny import build_tiny, tiny_tokenizer

    cfg = TinyConfig(family=family, phantom=phantom_cfg)  # the demo model's sizes
    tok = tiny_tokenizer(family, phantom_corpus(phantom_cfg), cfg.vocab_size)
    model, processor = build_tiny(family, cfg.sizes(), tok)
    folder = root / f"demo-arch-{family}"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    adapters = []
    for seed, name in ((1, "stage1"), (2, "stage2")):
        torch.manual_seed(seed)
        base = load_model_and_processor(str(folder)).model
        regex = get_family(family).lora_target_regex(["language"], {"language": ["q_proj", "v_proj", "o_proj"]})
        lora = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=regex)
        peft_model = get_peft_model(base, lora)
        out = root / f"run-{family}" / name / "adapter"
        peft_model.save_pretrained(out)
        adapters.append(out)
    return folder, adapters
