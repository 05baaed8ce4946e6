"""Memory per GPU of a LoRA / QLoRA stage for the checkpoints medvlm's users fine-tune, under each
accelerate config (DDP, DeepSpeed ZeRO-2, FSDP full shard / ZeRO-3): the README's table.

    python benchmarks/memory_table.py                     # 8 GPUs, batch 1, gradient checkpointing
    python benchmarks/memory_table.py --gpus 4 --batch 2 --parts

Each model is built from its published config on the ``meta`` device (no weights, no download) and
counted by :mod:`medvlm.training.memory`, whose docstring states every formula. PaliGemma and LLaVA
take the widths the families record (``real_shapes``); Gemma 3 / MedGemma are written below.
"""

from __future__ import annotations

import argparse

from transformers import Gemma3Config, LlavaConfig, PaliGemmaConfig

from medvlm.models.families import get_family
from medvlm.training.memory import GIB, Setup, breakdown, count, table

#: Gemma 3 (MedGemma) config.json values: the 4B (text 2560 wide, MLP 10240, 34 layers, 8 heads, 4 KV
#: heads of 256) and google/medgemma-27b-it (text 5376 wide, MLP 21504, 62 layers, 32 heads, 16 KV heads
#: of 128), both with vocabulary 262,208 and the same SigLIP tower at 896 px. The 27B widths were
#: checked against NVIDIA/TensorRT-LLM (commit fe6fa01d, tests/unittest/_torch/modeling/
#: test_modeling_gemma3.py, GEMMA3_27B_CONFIG, whose depth is cut); the 62 layers are the published
#: config's. 27.43 B parameters come out (the checkpoint is published as 27B).
SIGLIP_896 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=896, patch_size=14, vision_use_head=False)
GEMMA3 = {
    "MedGemma-4B": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=262208),
    "MedGemma-27B": dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                         num_key_value_heads=16, head_dim=128, vocab_size=262208),
}
#: Gemma 3's projector is a bare weight (no nn.Linear for LoRA): medvlm trains it whole
GEMMA3_WHOLE = ("mm_input_projection_weight",)


def configs() -> dict[str, tuple[object, tuple[str, ...]]]:
    pg = get_family("paligemma").real_shapes["paligemma-3b-mix-448"]
    llava = get_family("llava").real_shapes["llava-1.5-7b-hf"]
    out = {
        "PaliGemma-3B-mix-448": (PaliGemmaConfig(
            vision_config={**pg["vision"], "model_type": "siglip_vision_model"},
            text_config={**pg["text"], "model_type": "gemma"}, projection_dim=pg["text"]["hidden_size"],
            vocab_size=pg["text"]["vocab_size"]), ()),
        "LLaVA-1.5-7B": (LlavaConfig(vision_config={**llava["vision"], "model_type": "clip_vision_model"},
                                     text_config={**llava["text"], "model_type": "llama"}, **llava["projector"]), ()),
    }
    for name, text in GEMMA3.items():
        out[name] = (Gemma3Config(text_config=text, vision_config=SIGLIP_896, mm_tokens_per_image=256), GEMMA3_WHOLE)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="sequences per GPU")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--parts", action="store_true", help="also print each model's breakdown under FSDP")
    args = ap.parse_args(argv)
    setup = dict(batch=args.batch, text_tokens=args.text_tokens, checkpointing=not args.no_checkpointing)
    models = [count(cfg, name, trained_whole=whole) for name, (cfg, whole) in configs().items()]
    print(table(models, gpus=args.gpus, **setup))
    if args.parts:
        for c in models:
            for qlora in (False, True):
                parts = breakdown(c, Setup(strategy="fsdp", gpus=args.gpus, qlora=qlora, **setup))
                print(c.name, "QLoRA" if qlora else "LoRA", {k: round(v / GIB, 2) for k, v in parts.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
