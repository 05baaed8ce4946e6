"""The embedded tiny models: real transformers classes, a tokenizer built here, a short base pre-training.

``ensure_base_model("paligemma" | "llava")`` returns a folder holding a tiny
``PaliGemmaForConditionalGeneration`` or ``LlavaForConditionalGeneration`` with its processor,
after a short *full-parameter* pre-training on phantom captions, so that the LoRA stages adapt a
model that already sees. The folder is cached under ``$MEDVLM_HOME/base/`` keyed by the hash of
:class:`TinyConfig` (and the phantom generator version): change a field and it is rebuilt.

The tokenizer is a byte-level BPE trained on the phantom corpus: any text encodes (unknown
words fall back to bytes), and the vocabulary stays small (~1k tokens, plus PaliGemma's
1,152 location/segmentation tokens that its processor adds).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    TrainingArguments,
)

from medvlm.data_curation.phantom import GENERATOR_VERSION, PhantomConfig, load_phantom
from medvlm.utils.images import read_mask
from medvlm.utils.io import medvlm_home, sha256_json, write_manifest

logger = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]

#: Bump when the pre-training recipe changes (it enters the cache key with TinyConfig).
BASE_RECIPE_VERSION = 2

#: A LLaVA-1.5-style template ("USER: <image>\n... ASSISTANT: ...") whose assistant turn starts at
#: a token boundary, so the prompt is a token prefix of the full conversation.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
    "{% else %}ASSISTANT:{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}"
    "{% endif %}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class TinyConfig:
    """Sizes and pre-training of a tiny family model. Every field enters the cache key."""

    family: str = "paligemma"
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    vocab_size: int = 800
    vision_pretrain_steps: int = 3000
    vision_pretrain_lr: float = 1e-3
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 32
    pretrain_lr: float = 1e-3
    seed: int = 0
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    def key(self) -> str:
        return sha256_json({**asdict(self), "generator": GENERATOR_VERSION, "recipe": BASE_RECIPE_VERSION})[:16]


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>", padding_side="right",
                                   extra_special_tokens={"image_token": "<image>"})


def phantom_corpus(cfg: PhantomConfig) -> list[str]:
    texts: list[str] = []
    for kind in ("qa", "captions", "cases", "generic"):
        ds = load_phantom(cfg, kind=kind)
        texts += list(ds["question"]) + list(ds["answer"])
    texts += ["USER: ASSISTANT: answer en caption en", "0123456789 .,;:!?()-'\"/"]
    return texts


def build_tiny(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast):
    """(model, processor) with random weights, from configs."""
    torch.manual_seed(cfg.seed)
    size = {"height": cfg.image_size, "width": cfg.image_size}
    grid = (cfg.image_size // cfg.patch_size) ** 2
    if cfg.family == "paligemma":
        image_processor = SiglipImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        image_processor.image_seq_length = grid
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        vocab = len(processor.tokenizer)
        vision = SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                                    num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                    image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False)
        text = GemmaConfig(hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                           num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                           num_key_value_heads=cfg.text_heads, head_dim=cfg.text_hidden // cfg.text_heads,
                           vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                                 vocab_size=vocab, projection_dim=cfg.text_hidden, hidden_size=cfg.text_hidden)
        model = PaliGemmaForConditionalGeneration(config)
    elif cfg.family == "llava":
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size}, crop_size=size,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=cfg.patch_size, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
        vocab = len(tokenizer)
        vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                  image_size=cfg.image_size, patch_size=cfg.patch_size,
                                  projection_dim=cfg.vision_hidden)
        text = LlamaConfig(hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                           num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                           num_key_value_heads=cfg.text_heads, vocab_size=vocab,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id, max_position_embeddings=512)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(config)
    else:
        raise ValueError(f"no tiny model for family {cfg.family!r}; expected 'paligemma' or 'llava'")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


#: Image-level labels of the vision-tower pre-training: (meta key, classes). "none" = no lesion.
VISION_LABELS = (
    ("modality", ("CT", "MRI", "X-ray")),
    ("body_part", ("chest", "abdomen", "head")),
    ("finding", ("none", "nodule", "mass", "cyst")),
    ("side", ("", "left", "right")),
    ("zone", ("", "upper", "lower", "frontal", "occipital")),
)


def _vision_targets(records) -> torch.Tensor:
    rows = []
    for meta in records["meta"]:
        m = json.loads(meta)
        zone = next((z for z in ("upper", "lower", "frontal", "occipital") if z in m.get("location", "")), "")
        m["zone"] = zone
        rows.append([classes.index(m.get(key, "") or classes[0]) for key, classes in VISION_LABELS])
    return torch.tensor(rows)


def _patch_coverage(records, grid: int, size: int) -> torch.Tensor:
    """Share of each patch covered by the lesion mask: [n_images, grid*grid] (0 without a lesion)."""
    out = torch.zeros(len(records), grid * grid)
    cell = size // grid
    for i, roi in enumerate(records["roi"]):
        if roi:
            mask = torch.from_numpy(read_mask(roi, size=(size, size)).astype(np.float32))
            out[i] = mask.reshape(grid, cell, grid, cell).mean(dim=(1, 3)).flatten()
    return out


def pretrain_vision(model, processor, cfg: TinyConfig) -> dict:
    """Supervised pre-training of the vision tower and projector on phantom labels.

    Real VLMs start from a vision tower pre-trained on its own (SigLIP's image-text loss, CLIP's,
    and detection data); a tiny tower trained from scratch only through captioning learns the global
    look (modality, body part) long before small lesions. Two linear heads stand in for that
    pre-training and are thrown away afterwards: image labels from the mean of the projected image
    tokens, and, per token, whether the lesion covers that patch and (on lesion patches) the
    lesion's side, zone and type, so a lesion token carries what it is and where it sits.
    """
    from medvlm.training.collator import NO_RESIZE
    from medvlm.training.data import prepare_examples

    records = load_phantom(cfg.phantom, kind="captions", split="train")
    examples = prepare_examples(records, processor)
    targets = _vision_targets(records)
    grid = cfg.image_size // cfg.patch_size
    coverage = _patch_coverage(records, grid, cfg.image_size)
    sizes = [len(c) for _, c in VISION_LABELS]
    head = torch.nn.Linear(cfg.text_hidden, sum(sizes))
    token_sizes = [1] + sizes[2:]  # lesion here?, finding, side, zone
    token_head = torch.nn.Linear(cfg.text_hidden, sum(token_sizes))
    params = [p for n, p in model.named_parameters() if "language_model" not in n and "lm_head" not in n]
    opt = torch.optim.AdamW(params + list(head.parameters()) + list(token_head.parameters()),
                            lr=cfg.vision_pretrain_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    ce = torch.nn.functional.cross_entropy
    model.train()
    losses = []
    for _ in range(cfg.vision_pretrain_steps):
        idx = torch.randint(len(examples), (cfg.pretrain_batch_size,), generator=gen)
        pixels = processor.image_processor([examples.images[examples.image_index[i]] for i in idx],
                                           return_tensors="pt", **NO_RESIZE)["pixel_values"]
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # [B, T, D]
        logits = head(feats.mean(dim=1)).split(sizes, dim=-1)
        loss = sum(ce(lg, targets[idx, k]) for k, lg in enumerate(logits))
        tok = token_head(feats).split(token_sizes, dim=-1)  # per token
        cov = coverage[idx]
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(tok[0].squeeze(-1), (cov > 0.15).float())
        on = cov > 0.15
        if on.any():
            for k, lg in enumerate(tok[1:]):
                lesion_target = targets[idx, 2 + k].unsqueeze(1).expand_as(cov)
                loss = loss + ce(lg[on], lesion_target[on])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"vision_loss_first": losses[0], "vision_loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "vision_steps": len(losses)}


def pretrain(model, processor, cfg: TinyConfig, work_dir: Path) -> dict:
    """Full-parameter pre-training on the phantom train split: captions (which name modality, region,
    finding, side and place) mixed with general short-answer VQA, as a real base's mixture has both."""
    from medvlm.models.families import get_family
    from medvlm.training.collator import VLMCollator
    from medvlm.training.data import prepare_examples
    from medvlm.training.trainer import MedVLMTrainer

    family = get_family(cfg.family)
    import datasets

    generic = load_phantom(cfg.phantom, kind="generic", split="train")
    # grounding questions (which half, which part, what it looks like) twice: they are the base's
    # only short-answer practice at reading *where* and *what* from single image tokens
    grounding = ("generic_half", "generic_part", "generic_look", "generic_half_yn", "generic_look_yn")
    spatial = generic.filter(lambda m: json.loads(m)["qtype"] in grounding, input_columns="meta")
    records = datasets.concatenate_datasets([load_phantom(cfg.phantom, kind="captions", split="train"),
                                             generic, spatial])
    examples = prepare_examples(records, processor)
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=cfg.pretrain_steps, per_device_train_batch_size=cfg.pretrain_batch_size,
        learning_rate=cfg.pretrain_lr, warmup_steps=max(1, cfg.pretrain_steps // 20), lr_scheduler_type="cosine",
        weight_decay=0.0, logging_steps=50, save_strategy="no", report_to=[], seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=None,
    )
    trainer = MedVLMTrainer(model=model, args=args, train_dataset=examples,
                            data_collator=VLMCollator(family, processor))
    result = trainer.train()
    return {"loss": result.training_loss, "steps": result.global_step, **result.metrics}


def base_model_dir(family: str = "paligemma", cfg: TinyConfig | None = None) -> Path:
    """Where ``demo:<family>`` lives under ``$MEDVLM_HOME`` (built or not): the folder name holds a
    hash of the config, so a changed config gets a new folder."""
    cfg = cfg or TinyConfig(family=family)
    return medvlm_home() / "base" / f"{cfg.family}-{cfg.key()}"


def ensure_base_model(family: str = "paligemma", cfg: TinyConfig | None = None,
                      root: str | Path | None = None) -> Path:
    """The cached tiny base model folder for ``family``; built (a few minutes on a CPU) if missing."""
    cfg = cfg or TinyConfig(family=family)
    folder = Path(root) if root else base_model_dir(family, cfg)
    if (folder / "manifest.json").exists():
        return folder
    logger.info("building the tiny %s base model in %s (cached for later runs)", cfg.family, folder)
    tokenizer = build_tokenizer(phantom_corpus(cfg.phantom), cfg.vocab_size)
    model, processor = build_tiny(cfg, tokenizer)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = pretrain_vision(model, processor, cfg)
    stats.update(pretrain(model, processor, cfg, tmp / "pretrain"))
    shutil.rmtree(tmp / "pretrain", ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))
    (tmp / "tiny_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    write_manifest(tmp, kind="tiny-base", family=cfg.family, key=cfg.key(), pretrain=stats,
                   parameters=sum(p.numel() for p in model.parameters()))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
