"""The memory-per-GPU estimate: counts from the real modelling class, and the formulas on hand-computed cases."""

from __future__ import annotations

import pytest
from peft import get_peft_model
from tiny_models import eager_tiny

from medvlm.training.arguments import LoraArguments
from medvlm.training.lora import lora_config
from medvlm.training.memory import (
    BF16,
    NF4_DQ,
    ModelCounts,
    Setup,
    Tower,
    breakdown,
    count,
    image_tokens,
)


@pytest.mark.parametrize("family", ["paligemma", "llava"])
def test_counts_equal_the_built_model_and_peft(family):
    model, _, fam = eager_tiny(family)
    c = count(model.config, family)
    assert c.params == sum(p.numel() for p in model.parameters())
    # LoRA r=12 on the "full" preset: what PEFT trains with medvlm's own LoRA config
    peft_model = get_peft_model(model, lora_config(fam, LoraArguments()))
    assert c.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # the largest FSDP unit is a language block; the embedding unit is the vocabulary x width matrix
    layer = fam.decoder_layers(peft_model)[0]
    assert c.block == sum(p.numel() for n, p in layer.named_parameters() if "lora_" not in n)
    text = model.config.text_config
    assert c.embedding == text.vocab_size * text.hidden_size and c.vocab == text.vocab_size
    assert c.language.layers == text.num_hidden_layers and c.language.gated
    assert not c.vision.gated and c.vision.tokens == (model.config.vision_config.image_size
                                                      // model.config.vision_config.patch_size) ** 2
    assert c.language.tokens == image_tokens(model.config) == c.vision.tokens  # 1 token per patch here


def test_block_activation_formula():
    # h=4, q=4, kv=2, gated MLP 8: 2 B * (4*4 + 2*4 + 2*2 + 4*8) = 2 * 60 = 120 B per token
    t = Tower(layers=3, hidden=4, q_width=4, kv_width=2, mlp=8, gated=True, tokens=5, lora_inputs=10)
    assert t.block_bytes(lora_dropout=False) == 120
    assert t.block_bytes(lora_dropout=True) == 120 + 3 * 10          # input copy (2 B) + mask (1 B)
    plain = Tower(layers=3, hidden=4, q_width=4, kv_width=2, mlp=8, gated=False, tokens=5)
    assert plain.block_bytes(lora_dropout=False) == 2 * (16 + 8 + 4 + 16)
    # checkpointing keeps every block's input (2 B * h per layer) and one block being recomputed
    assert t.activation_bytes(7, checkpointing=True, lora_dropout=False) == 7 * (2 * 4 * 3 + 120)
    assert t.activation_bytes(7, checkpointing=False, lora_dropout=False) == 7 * 120 * 3


def _counts() -> ModelCounts:
    vision = Tower(layers=2, hidden=4, q_width=4, kv_width=4, mlp=8, gated=False, tokens=9)
    language = Tower(layers=3, hidden=4, q_width=4, kv_width=2, mlp=8, gated=True, tokens=6)
    # 100 trainable: 60 LoRA (added to the base) and 40 base parameters trained whole
    return ModelCounts(name="toy", params=10_000, quantizable=6_000, trainable=100, block=800, embedding=1_000,
                       vocab=50, vision=vision, language=language, whole=40)


def test_breakdown_by_strategy_hand_computed():
    c = _counts()
    setup = dict(gpus=4, batch=2, text_tokens=4, checkpointing=False, lora_dropout=False)
    # activations: vision 9 tokens * 2*(16+8+8+16)=96 B * 2 layers; language (6+4) tokens * 120 B * 3
    # layers; logits 10 B * 10 tokens * 50 vocabulary; times batch 2
    acts = 2 * (9 * 96 * 2 + 10 * 120 * 3 + 10 * 10 * 50)
    ddp = breakdown(c, Setup(strategy="ddp", **setup))
    # frozen: the 10,000 base parameters less the 40 trained whole
    assert ddp == {"weights 4-bit": 0, "weights bf16": 9_960 * 2, "trainable": 100 * 16, "activations": acts}
    zero2 = breakdown(c, Setup(strategy="zero2", **setup))
    assert zero2["weights bf16"] == 9_960 * 2 and zero2["trainable"] == 100 * (2 + 14 / 4)
    fsdp = breakdown(c, Setup(strategy="fsdp", **setup))
    assert fsdp["weights bf16"] == 9_960 * 2 / 4 and fsdp["trainable"] == 100 * 16 / 4
    assert fsdp["gathered units"] == 2 * (1_000 + 2 * 800) and fsdp["activations"] == acts
    # QLoRA: the 6,000 linear weights packed (never sharded), the other 3,960 frozen stay bf16
    q = breakdown(c, Setup(strategy="fsdp", qlora=True, **setup))
    assert q["weights 4-bit"] == pytest.approx(6_000 * 0.515869140625) and q["weights bf16"] == 3_960 * BF16 / 4
    assert NF4_DQ == pytest.approx(0.5 + 0.127 / 8, abs=1e-4)  # QLoRA paper: 0.127 bits per weight for constants


def test_sharding_and_qlora_order_the_strategies():
    c = _counts()
    totals = {s: sum(breakdown(c, Setup(strategy=s, gpus=8)).values()) for s in ("ddp", "zero2", "fsdp")}
    assert totals["fsdp"] < totals["zero2"] < totals["ddp"]
    one = sum(breakdown(c, Setup(strategy="fsdp", gpus=1)).values())
    assert one > totals["fsdp"]


def test_bad_setup_names_the_value():
    with pytest.raises(ValueError, match="'zero3'"):
        Setup(strategy="zero3")
    with pytest.raises(ValueError, match="gpus=0"):
        Setup(gpus=0)


def _saved_bytes_per_block_token(build, inputs: dict, tokens: int) -> float:
    """Bytes autograd keeps for the backward, per block and token: the difference between a 4-block
    and a 2-block model (the embedding, head and loss cancel), parameters' own storage left out."""
    import torch

    def saved(model) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
        return sum(kept.values())

    return (saved(build(4)) - saved(build(2))) / 2 / tokens


def _lora_like(model):
    """Trainable linear weights in the blocks only (what LoRA makes autograd keep), norms frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in f".{name}" and ("proj" in name or "fc" in name))
    return model.train()


def test_block_activation_formula_matches_what_autograd_keeps():
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    def gemma(layers):
        torch.manual_seed(0)
        return _lora_like(GemmaForCausalLM(GemmaConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=100, attn_implementation="sdpa")))

    def siglip(layers):
        torch.manual_seed(0)
        return _lora_like(SiglipVisionModel(SiglipVisionConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4, image_size=32,
            patch_size=8, vision_use_head=False, attn_implementation="sdpa")))

    ids = torch.randint(0, 100, (2, 32))
    measured = _saved_bytes_per_block_token(gemma, dict(input_ids=ids, labels=ids), 2 * 32)
    formula = 2 * Tower(1, 64, 64, 32, 256, gated=True, tokens=0).block_bytes(False)  # float32 = 2 x bf16
    assert measured == pytest.approx(formula, rel=0.03)
    measured = _saved_bytes_per_block_token(siglip, dict(pixel_values=torch.randn(2, 3, 32, 32)), 2 * 16)
    formula = 2 * Tower(1, 64, 64, 64, 256, gated=False, tokens=0).block_bytes(False)
    assert measured == pytest.approx(formula, rel=0.03)


def test_gemma3_counts_its_pooled_image_tokens_tied_head_and_whole_trained_projector():
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=300),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8),
                          mm_tokens_per_image=4)
    c = count(config, "gemma3", r=2, target_names=("q_proj",), trained_whole=("mm_input_projection_weight",))
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert c.params == sum(p.numel() for p in model.parameters())           # the tied head once
    assert c.embedding == 300 * 64 and c.whole == 32 * 64                     # projector: vision x text width
    # r=2 on q_proj: 2 vision blocks (32 -> 32), 3 text blocks (64 -> 2 heads x 32); plus the projector
    assert c.trainable == 2 * 2 * (32 + 32) + 3 * 2 * (64 + 64) + 32 * 64
    assert c.language.tokens == 4 and c.vision.tokens == 16 and c.language.kv_width == 32
