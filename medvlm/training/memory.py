"""Memory per GPU of a LoRA / QLoRA stage under DDP, ZeRO-2 and FSDP full shard / ZeRO-3, computed
from a model's config (what ``recipes/accelerate/*.yaml`` need, before renting the GPUs).

The parameters are counted on the real modelling class built on the ``meta`` device (no weights), so the counts are the checkpoint's; the rest is arithmetic:

- **frozen weights**: bf16, 2 B per parameter. QLoRA packs every ``nn.Linear`` weight but the
  output embedding as 4-bit NF4 with double quantisation: 0.5 B + 8/64 bit + 32/(64·256) bit ≈
  0.5159 B per weight (Dettmers et al. 2023, "QLoRA", section 2: a block of 64 weights shares an
  8-bit absmax, 256 blocks share a fp32 constant); embeddings, norms and biases stay bf16.
- **trainable** (LoRA A and B, rank r, for every targeted ``nn.Linear(in, out)``: r·(in + out); plus
  parameters trained whole): 16 B per parameter, kept in fp32 by PEFT (weight 4, gradient 4, Adam
  m and v 8); with DeepSpeed's bf16 accounting it is 2 + 2 + 12 (Rajbhandari et al. 2020, "ZeRO",
  section 3), the same 16 B.
- **sharding over N GPUs**: DDP replicates everything; ZeRO-2 keeps the bf16 trainable weights (2 B)
  and shards gradients and optimizer state (14 B / N); FSDP full shard and ZeRO-3 shard everything
  (frozen and trainable / N) but gather the unit being computed and the next (prefetch) whole, and
  the tied embedding / LM-head unit stays gathered from the forward to its backward (accelerate
  puts it in a unit with ``reshard_after_forward=False``): working set = embedding unit + 2 ×
  largest transformer block, bf16 (ZeRO-3 bounds its gathered set by ``stage3_max_live_parameters``
  instead; the same estimate is used). 4-bit weights stored as uint8 (medvlm's ``BitsAndBytesConfig``)
  are not sharded: accelerate's ``fsdp2_prepare_model`` leaves non-floating frozen ``Params4bit``
  out of ``fully_shard``; they count whole on every GPU.
- **activations** (bf16, per token, with SDPA / flash attention, so no sequence² term): what a
  block keeps for its backward is, for a block of width h, query width q = heads·head_dim,
  key/value width k = kv_heads·head_dim and MLP width m,
  ``a = 2 B · (4h + 2q + 2k + g·m)`` with g = 4 for a gated MLP (gate, up, their product, the
  activation) and 2 for a plain one; LoRA dropout adds, per targeted linear, a copy of its input
  (2 B) and a mask (1 B). With gradient checkpointing (medvlm's default) a tower of L blocks keeps
  each block's input, ``2 B · h · L`` per token, plus one block's ``a`` while it is recomputed;
  without, ``a · L``. The language model's logits and loss keep about 10 B per token and vocabulary
  entry (bf16 logits 2, fp32 log-probabilities 4, their gradient 4). Tokens: the vision tower sees
  (image / patch)² patches per image, the language model the image tokens plus the text.
- Not counted: the CUDA context and allocator fragmentation (about 1-3 GB per GPU), temporary
  buffers of collectives, evaluation and generation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

GIB = 2**30
BF16 = 2
NF4_DQ = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8   # bytes per 4-bit weight, double quantisation
TRAINABLE = 16                                    # bytes per trainable parameter with Adam
ZERO2_REPLICATED = 2                              # bf16 trainable weights ZeRO-2 keeps on every GPU
LOGIT_BYTES = 10                                  # per token and vocabulary entry
DROPOUT_BYTES = BF16 + 1                          # dropped input copy + bool mask
STRATEGIES = ("ddp", "zero2", "fsdp")
#: the LoRA target names of medvlm's "full" preset (SigLIP / CLIP and Llama / Gemma, both towers
#: and the projector; see medvlm.models.base.SIGLIP_LLAMA_LORA_PRESETS)
FULL_PRESET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "gate_proj", "up_proj",
                     "down_proj", "linear", "linear_1", "linear_2")


@dataclass(frozen=True)
class Tower:
    """The shape of one transformer stack, for the activation estimate."""

    layers: int
    hidden: int
    q_width: int
    kv_width: int
    mlp: int
    gated: bool
    tokens: int            # per image (vision) or image tokens in the sequence (language)
    lora_inputs: int = 0   # sum of the input widths of the LoRA-targeted linears of one block

    def block_bytes(self, lora_dropout: bool) -> float:
        """``a``: bytes one block keeps per token for its backward."""
        g = 4 if self.gated else 2
        a = BF16 * (4 * self.hidden + 2 * self.q_width + 2 * self.kv_width + g * self.mlp)
        return a + (DROPOUT_BYTES * self.lora_inputs if lora_dropout else 0)

    def activation_bytes(self, tokens: int, checkpointing: bool, lora_dropout: bool) -> float:
        a = self.block_bytes(lora_dropout)
        if checkpointing:
            return tokens * (BF16 * self.hidden * self.layers + a)
        return tokens * a * self.layers


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a checkpoint and the shapes its activations follow."""

    name: str
    params: int             # every parameter of the base once (tied weights once), LoRA not included
    quantizable: int        # nn.Linear weights but the output embedding: what 4-bit QLoRA packs
    trainable: int          # LoRA A and B (added to the base), plus base parameters trained whole
    block: int              # parameters of the largest transformer block (one FSDP unit)
    embedding: int          # parameters of the embedding / LM-head unit (tied: once)
    vocab: int
    vision: Tower
    language: Tower
    whole: int = 0          # base parameters trained whole (part of both ``params`` and ``trainable``)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _tower(cfg, tokens: int, gated: bool, lora_inputs: int) -> Tower:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return Tower(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, q_width=heads * head_dim,
                 kv_width=kv * head_dim, mlp=cfg.intermediate_size, gated=gated, tokens=tokens,
                 lora_inputs=lora_inputs)


def image_tokens(config) -> int:
    """Image tokens the language model reads per image: Gemma 3's pooled ``mm_tokens_per_image``,
    else one per vision patch (PaliGemma; LLaVA with its class token dropped). LLaVA's
    ``image_seq_length`` is not read: it is a processor default (576) that does not follow the
    vision config."""
    if getattr(config, "mm_tokens_per_image", None):
        return int(config.mm_tokens_per_image)
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def meta_model(config) -> torch.nn.Module:
    """The checkpoint's modelling class with no weights (parameters on ``meta``). Built under
    ``torch.device("meta")``, not ``accelerate.init_empty_weights``: the latter re-registers every
    parameter it sees, which unties a tied LM head from the embedding (counted twice)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _block_of(name: str) -> str | None:
    m = re.match(r"(.*\.layers\.\d+)\.", name)
    return m.group(1) if m else None


def count(config, name: str, r: int = 12, target_names: Iterable[str] = FULL_PRESET_NAMES,
          trained_whole: Iterable[str] = ()) -> ModelCounts:
    """Counts of ``config``'s model with LoRA of rank ``r`` on every ``nn.Linear`` whose last name is
    in ``target_names`` (both towers and the projector, as medvlm's "full" preset), and the
    parameters whose name ends with one of ``trained_whole`` trained fully."""
    model = meta_model(config)
    targets, whole = set(target_names), tuple(trained_whole)
    out_embed = model.get_output_embeddings()
    in_embed = model.get_input_embeddings()
    lora, quantizable = 0, 0
    lora_inputs = {"vision": {}, "language": {}}
    for mod_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_embed:
            continue
        quantizable += module.weight.numel()
        leaf = mod_name.rsplit(".", 1)[-1]
        if leaf in targets:
            lora += r * (module.in_features + module.out_features)
            block = _block_of(mod_name)
            if block is not None and block.endswith(".layers.0"):
                tower = "vision" if "vision" in mod_name else "language"
                lora_inputs[tower][leaf] = module.in_features
    params, blocks, trained_fully = 0, {}, 0
    for pname, p in model.named_parameters():  # a tied weight once
        params += p.numel()
        if whole and pname.endswith(whole):
            trained_fully += p.numel()
        block = _block_of(pname)
        if block is not None:
            blocks[block] = blocks.get(block, 0) + p.numel()
    embedding = in_embed.weight.numel()
    if out_embed is not None and out_embed.weight is not in_embed.weight:
        embedding = max(embedding, out_embed.weight.numel())
    text, vision = _text_config(config), config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    gated = any(n.endswith("gate_proj") for n, _ in model.named_modules())
    return ModelCounts(
        name=name, params=params, quantizable=quantizable,
        trainable=lora + trained_fully, whole=trained_fully, block=max(blocks.values()), embedding=embedding, vocab=text.vocab_size,
        # each targeted linear's LoRA applies its own dropout to its input: q, k and v keep a copy each
        vision=_tower(vision, patches, gated=False, lora_inputs=sum(lora_inputs["vision"].values())),
        language=_tower(text, image_tokens(config), gated=gated, lora_inputs=sum(lora_inputs["language"].values())))


@dataclass(frozen=True)
class Setup:
    """One training set-up: method, sharding, GPUs and what one GPU's batch holds."""

    strategy: str = "ddp"          # ddp | zero2 | fsdp (FSDP full shard, or ZeRO-3)
    gpus: int = 8
    qlora: bool = False
    batch: int = 1                 # sequences per GPU
    text_tokens: int = 128         # question + answer tokens per sequence
    checkpointing: bool = True
    lora_dropout: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: expected one of {STRATEGIES}")
        if self.gpus < 1 or self.batch < 1:
            raise ValueError(f"gpus and batch must be >= 1, got gpus={self.gpus}, batch={self.batch}")


def breakdown(c: ModelCounts, s: Setup) -> dict[str, float]:
    """Bytes per GPU, by part (see the module docstring for each formula)."""
    n = s.gpus
    frozen_total = c.params - c.whole                        # LoRA adds parameters; whole-trained ones leave
    packed = c.quantizable if s.qlora else 0                 # 4-bit weights (never sharded, uint8)
    other = frozen_total - packed                            # bf16 frozen weights
    out = {"weights 4-bit": packed * NF4_DQ}
    if s.strategy == "fsdp":
        out["weights bf16"] = other * BF16 / n
        out["trainable"] = c.trainable * TRAINABLE / n
        out["gathered units"] = BF16 * (c.embedding + 2 * c.block)
    elif s.strategy == "zero2":
        out["weights bf16"] = other * BF16
        out["trainable"] = c.trainable * (ZERO2_REPLICATED + (TRAINABLE - ZERO2_REPLICATED) / n)
    else:
        out["weights bf16"] = other * BF16
        out["trainable"] = c.trainable * TRAINABLE
    text_len = c.language.tokens + s.text_tokens
    out["activations"] = s.batch * (
        c.vision.activation_bytes(c.vision.tokens, s.checkpointing, s.lora_dropout)
        + c.language.activation_bytes(text_len, s.checkpointing, s.lora_dropout)
        + LOGIT_BYTES * text_len * c.vocab)
    return out


def per_gpu_gib(c: ModelCounts, s: Setup) -> float:
    return sum(breakdown(c, s).values()) / GIB


def table(models: list[ModelCounts], gpus: int = 8, **setup) -> str:
    """A Markdown table: GiB per GPU for each model, with LoRA and QLoRA, under each strategy."""
    heads = ["model", "parameters", "trainable (LoRA r=12 + whole)"]
    heads += [f"{label} {method}" for label in ("DDP", "ZeRO-2", "FSDP / ZeRO-3") for method in ("LoRA", "QLoRA")]
    rows = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for c in models:
        cells = [c.name, f"{c.params / 1e9:.2f} B", f"{c.trainable / 1e6:.1f} M"]
        for strategy in STRATEGIES:
            for qlora in (False, True):
                cells.append(f"{per_gpu_gib(c, Setup(strategy=strategy, gpus=gpus, qlora=qlora, **setup)):.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
