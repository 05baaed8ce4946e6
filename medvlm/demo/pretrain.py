"""Base pre-training of a tiny family model on phantom data: the vision tower first, then everything.

A recipe, not a family: it uses the training stack (the collator, the trainer) on the tiny model
that :mod:`medvlm.models.tiny` builds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from transformers import TrainingArguments

from medvlm.data_curation.phantom import load_phantom
from medvlm.diagnostics.attention_quality import mask_to_grid
from medvlm.models.families import get_family
from medvlm.models.inputs import VLMCollator, prepare_examples
from medvlm.training.trainer import MedVLMTrainer
from medvlm.utils.images import read_mask

if TYPE_CHECKING:
    from medvlm.demo.base import TinyConfig

logger = logging.getLogger(__name__)


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


def _token_coverage(records, grid: tuple[int, int]) -> torch.Tensor:
    """Share of each image token's cell covered by the lesion mask: [n_images, rows*cols] (0 without
    a lesion), the mask's area per cell of the token grid."""
    out = torch.zeros(len(records), grid[0] * grid[1])
    for i, roi in enumerate(records["roi"]):
        if roi:
            out[i] = torch.from_numpy(mask_to_grid(read_mask(roi), grid).astype(np.float32)).flatten()
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
    family = get_family(cfg.family)
    records = load_phantom(cfg.phantom, kind="captions", split="train")
    examples = prepare_examples(records, processor, family)
    targets = _vision_targets(records)
    coverage = None  # per image token: set from the grid of the first batch of features
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
    start = time.perf_counter()
    for step in range(cfg.vision_pretrain_steps):
        idx = torch.randint(len(examples), (cfg.pretrain_batch_size,), generator=gen)
        feats, grid = family.image_features(model, processor, [examples.image(int(i)) for i in idx])  # [B, T, D]
        if coverage is None:
            coverage = _token_coverage(records, grid)
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
        if (step + 1) % 250 == 0 or step + 1 == cfg.vision_pretrain_steps:
            logger.info("vision pre-training: step %d / %d, loss %.3f (mean of the last 20), %.0f s",
                        step + 1, cfg.vision_pretrain_steps, sum(losses[-20:]) / len(losses[-20:]),
                        time.perf_counter() - start)
    return {"vision_loss_first": losses[0], "vision_loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "vision_steps": len(losses)}


def _cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor of ``lr_scheduler_type: cosine`` with linear warm-up (as the trainer's)."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def vision_lr_factor(step: int, cfg: TinyConfig) -> float:
    """The vision tower's and projector's learning-rate factor at ``step`` of the language
    pre-training: 0 for the first ``vision_frozen_share`` of it, then the cosine schedule."""
    total = cfg.pretrain_steps
    if step < cfg.vision_frozen_share * total:
        return 0.0
    return _cosine(step, max(1, total // 20), total)


def _optimizer(model, family, cfg: TinyConfig):
    """AdamW (the trainer's default, no weight decay) with two groups: the language side on the
    cosine schedule, the vision tower and projector held still for ``cfg.vision_frozen_share``."""
    vision, language = [], []
    for name, p in model.named_parameters():
        (vision if family.tower_of(name) in ("vision", "projector") else language).append(p)
    opt = torch.optim.AdamW([{"params": language}, {"params": vision}], lr=cfg.pretrain_lr, weight_decay=0.0)
    warmup = max(1, cfg.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda step: _cosine(step, warmup, cfg.pretrain_steps), lambda step: vision_lr_factor(step, cfg)])
    return opt, sched


def pretrain(model, processor, cfg: TinyConfig, work_dir: Path) -> dict:
    """Full-parameter pre-training on the phantom train split: captions (which name modality, region,
    finding, side and place) mixed with general short-answer VQA, as a real base's mixture has both.
    The vision tower and projector keep still for the first ``cfg.vision_frozen_share`` of it (the
    family's ``tiny_vision_frozen_share``), so the random language model's first gradients do not
    wash out what :func:`pretrain_vision` taught them before the language model can read it."""
    family = get_family(cfg.family)
    generic = load_phantom(cfg.phantom, kind="generic", split="train")
    # grounding questions (which half, which part, what it looks like) twice: they are the base's
    # only short-answer practice at reading *where* and *what* from single image tokens
    grounding = ("generic_half", "generic_part", "generic_look", "generic_half_yn", "generic_look_yn")
    spatial = generic.filter(lambda m: json.loads(m)["qtype"] in grounding, input_columns="meta")
    records = datasets.concatenate_datasets([load_phantom(cfg.phantom, kind="captions", split="train"),
                                             generic, spatial])
    examples = prepare_examples(records, processor, family)
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=cfg.pretrain_steps, per_device_train_batch_size=cfg.pretrain_batch_size,
        learning_rate=cfg.pretrain_lr, warmup_steps=max(1, cfg.pretrain_steps // 20), lr_scheduler_type="cosine",
        weight_decay=0.0, logging_steps=50, save_strategy="no", report_to=[], seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=None,
    )
    trainer = MedVLMTrainer(model=model, args=args, train_dataset=examples,
                            data_collator=VLMCollator(family, processor),
                            optimizers=_optimizer(model, family, cfg) if cfg.vision_frozen_share > 0 else (None, None))
    result = trainer.train()
    return {"loss": result.training_loss, "steps": result.global_step, **result.metrics}
