"""LoRA per tower: build the config from a preset, start from a previous stage, count parameters."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from medvlm.models.base import LORA_PRESETS, ModelFamily
from medvlm.training.arguments import LoraArguments

logger = logging.getLogger(__name__)


class AdapterError(ValueError):
    """A previous-stage adapter that cannot be used; the message names the folder and the fix."""


def lora_config(family: ModelFamily, args: LoraArguments) -> LoraConfig:
    if args.lora_preset not in LORA_PRESETS:
        raise ValueError(f"unknown lora_preset {args.lora_preset!r}; expected one of {sorted(LORA_PRESETS)}")
    preset = LORA_PRESETS[args.lora_preset]
    return LoraConfig(
        r=args.lora_r or preset["r"],
        lora_alpha=args.lora_alpha or preset["alpha"],
        lora_dropout=args.lora_dropout,
        target_modules=family.lora_target_regex(args.lora_towers, preset["names"]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainable_by_tower(model: torch.nn.Module, family: ModelFamily) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per tower (vision, projector, language, lm_head)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "total": 0})
    for name, p in model.named_parameters():
        tower = family.tower_of(name.replace("base_model.model.", ""))
        counts[tower]["total"] += p.numel()
        if p.requires_grad:
            counts[tower]["trainable"] += p.numel()
    return dict(counts)


def check_adapter(folder: str, base_model: str) -> dict:
    """The previous stage's adapter exists and was trained on this base model."""
    path = Path(folder)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"init_adapter {folder}: no adapter_config.json there. Point init_adapter at the "
                           "'adapter' folder of a finished stage-1 run (e.g. runs/demo/stage1/adapter).")
    cfg = json.loads(cfg_file.read_text())
    trained_on = cfg.get("base_model_name_or_path")
    resolved = None
    meta_file = path / "medvlm_adapter.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        trained_on, resolved = meta.get("model_name_or_path", trained_on), meta.get("resolved_path")
    if trained_on and trained_on != base_model:
        raise AdapterError(f"init_adapter {folder} was trained on base model {trained_on!r}, but this stage "
                           f"loads {base_model!r}. Set model_name_or_path: {trained_on} (or train a new "
                           "stage-1 adapter on this base).")
    if resolved and base_model.startswith("demo:"):
        from medvlm.models.tiny import base_model_dir

        now = str(base_model_dir(base_model.split(":", 1)[1]))  # where it is, without building it
        if now != resolved:
            raise AdapterError(f"init_adapter {folder} was trained on the tiny base in {resolved}, but "
                               f"{base_model} now resolves to {now} (the demo base was rebuilt since, or "
                               "MEDVLM_HOME points elsewhere). Set MEDVLM_HOME to the run's, train stage 1 "
                               "again, or set model_name_or_path to the old folder.")
    return cfg


def attach_lora(model, family: ModelFamily, args: LoraArguments, base_model: str,
                quantized: bool = False, gradient_checkpointing: bool = False):
    """New adapter, or start from ``init_adapter`` (continue it, or merge it and add a new one)."""
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if args.init_adapter:
        check_adapter(args.init_adapter, base_model)
        if args.adapter_mode == "continue":
            model = PeftModel.from_pretrained(model, args.init_adapter, is_trainable=True)
            return model
        if quantized:
            raise AdapterError("adapter_mode: merge needs an unquantised base (merging into 4/8-bit weights "
                               "loses precision); use adapter_mode: continue with QLoRA.")
        model = PeftModel.from_pretrained(model, args.init_adapter).merge_and_unload()
    return get_peft_model(model, lora_config(family, args))


def log_trainable(model, family: ModelFamily) -> dict[str, dict[str, int]]:
    counts = trainable_by_tower(model, family)
    for tower, c in sorted(counts.items()):
        logger.info("%-10s trainable %9d / %10d (%.2f%%)", tower, c["trainable"], c["total"],
                    100.0 * c["trainable"] / max(c["total"], 1))
    return counts
