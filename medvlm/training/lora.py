"""LoRA per tower: build the config from the family's preset, start from a previous stage, count parameters."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from medvlm.models.adapters import AdapterError, apply_adapter, check_adapter
from medvlm.models.base import ModelFamily
from medvlm.training.arguments import LoraArguments

logger = logging.getLogger(__name__)


def lora_config(family: ModelFamily, args: LoraArguments) -> LoraConfig:
    """The LoRA config of a stage: the family's preset names on the chosen towers; bare parameters
    (no LoRA target reaches them) of a chosen tower are trained fully (``modules_to_save``)."""
    presets = family.lora_presets
    if args.lora_preset not in presets:
        raise ValueError(f"unknown lora_preset {args.lora_preset!r} for the {family.name} family; expected one "
                         f"of {sorted(presets)}")
    preset = presets[args.lora_preset]
    bare = [name for name, (tower, _) in family.bare_parameters().items() if tower in args.lora_towers]
    return LoraConfig(
        r=args.lora_r or preset["r"],
        lora_alpha=args.lora_alpha or preset["alpha"],
        lora_dropout=args.lora_dropout,
        target_modules=family.lora_target_regex(args.lora_towers, preset["names"]),
        modules_to_save=bare or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainable_by_tower(model: torch.nn.Module, family: ModelFamily) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per tower (vision, projector, language, lm_head). A module that
    is trained fully (peft ``modules_to_save``) counts once: peft keeps a frozen ``original_module``
    beside the trained copy (to restore the base when the adapter is off), which is not a part of
    the model; counted, it would show a fully trained projector as 50 %."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "total": 0})
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        tower = family.tower_of(name.replace("base_model.model.", ""))
        counts[tower]["total"] += p.numel()
        if p.requires_grad:
            counts[tower]["trainable"] += p.numel()
    return dict(counts)


def attach_lora(model, family: ModelFamily, args: LoraArguments, base_model: str,
                quantized: bool = False, gradient_checkpointing: bool = False):
    """New adapter, or start from ``init_adapter`` (continue it, or merge it and add a new one)."""
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if args.init_adapter:
        check_adapter(args.init_adapter, base_model, family.name, what="init_adapter")
        if args.adapter_mode == "continue":
            return apply_adapter(model, args.init_adapter, trainable=True)
        if quantized:
            raise AdapterError("adapter_mode: merge needs an unquantised base (merging into 4/8-bit weights "
                               "loses precision); use adapter_mode: continue with QLoRA.")
        model = apply_adapter(model, args.init_adapter, merge=True)
    return get_peft_model(model, lora_config(family, args))


def log_trainable(model, family: ModelFamily) -> dict[str, dict[str, int]]:
    counts = trainable_by_tower(model, family)
    for tower, c in sorted(counts.items()):
        logger.info("%-10s trainable %9d / %10d (%.2f%%)", tower, c["trainable"], c["total"],
                    100.0 * c["trainable"] / max(c["total"], 1))
    for name, (tower, reason) in family.bare_parameters().items():
        logger.info("%s takes no LoRA (%s); with %r in lora_towers it is trained fully", name, reason, tower)
    return counts


def gathered_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable tensors (LoRA and ``modules_to_save``) whole on the CPU, when FSDP shards them
    (``DTensor`` parameters); ``None`` when they are plain tensors, which ``save_pretrained`` reads
    itself. Under FSDP this is a collective: every process calls it, in the same order, before the
    main process saves (a main-process-only save would write one rank's shards, or hang). Only
    trainable parameters are gathered, so a 27B base is never assembled on one process."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not any(hasattr(p, "full_tensor") for _, p in params):
        return None
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for name, p in params}
