"""A few LoRA steps on the tiny PaliGemma, sharded with FSDP2 over gloo or in one process.

``python tests/fsdp_cpu_worker.py OUT.json ADAPTER_DIR`` under ``accelerate launch --config_file
recipes/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no`` (see
``tests/training/test_fsdp_cpu.py``). On a CPU machine accelerate 1.16 never selects FSDP (its
``AcceleratorState.__init__`` sets ``DistributedType.FSDP`` only for accelerator device types; a CPU
launch is ``MULTI_CPU``, i.e. DDP), so this worker records what accelerate chose, then hands the
plugin that the launcher built from the YAML to accelerate's own FSDP2 preparation
(``accelerate.utils.fsdp_utils.fsdp2_prepare_model``: auto wrap, the rank-0 load of
``cpu_ram_efficient_loading``, ``torch.distributed.fsdp.fully_shard``) and trains with a plain loop.
The Trainer is not used: it decides FSDP from the same state and would run DDP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from tiny_models import eager_tiny

from medvlm.training.arguments import LoraArguments
from medvlm.training.lora import gathered_adapter_state, lora_config
from medvlm.training.stage import save_adapter

STEPS, LR = 3, 1e-2
QUESTIONS = ["where is the lesion?", "is the liver abnormal?", "which lung?", "is there a lesion in the kidney?"]
ANSWERS = ["left lung", "no", "the left lung near the liver", "yes"]


def lora_model():
    """The tiny PaliGemma with LoRA on every tower (no dropout), LoRA B drawn non-zero so that the
    first step's gradients reach every LoRA matrix."""
    torch.manual_seed(0)
    model, processor, family = eager_tiny("paligemma")
    model.train()
    model = get_peft_model(model, lora_config(family, LoraArguments(lora_dropout=0.0)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model, processor, family


def halves(family, processor) -> list[dict]:
    """Two batches of two examples (one per rank): random 64-px images, fixed questions."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in QUESTIONS]
    return [family.model_inputs(family.train_batch(processor, images[s], QUESTIONS[s], ANSWERS[s], prepared=True))
            for s in (slice(0, 2), slice(2, 4))]


def train(model, batches: list[list[dict]], world: int) -> list[float]:
    """AdamW steps; each step's loss is the mean over this process' batches, averaged over ranks."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = sum(model(**b).loss for b in batches[0]) / len(batches[0])
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def trainable(model) -> dict[str, list[float]]:
    """Every trainable tensor, whole (a sharded one is gathered: a collective, on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().flatten().tolist()
    return out


def save(model, folder: Path) -> None:
    """The stage's adapter save: the trainable tensors gathered on every process, written by the main one."""
    state = gathered_adapter_state(model)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_adapter(model, folder, "tiny-paligemma", "paligemma", [], state_dict=state)


def run_single(adapter: Path) -> dict:
    """One process, both halves per step (the mean of the two halves' losses: what two ranks
    averaging their gradients compute)."""
    model, processor, family = lora_model()
    data = halves(family, processor)
    initial = trainable(model)
    losses = train(model, [data], 1)
    save(model, adapter)
    return {"losses": losses, "initial": initial, "final": trainable(model)}


def run_fsdp(adapter: Path) -> tuple[int, dict]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    accelerator = Accelerator(cpu=True)  # as the Trainer does on a CPU machine (medvlm sets use_cpu)
    state = AcceleratorState()
    report = {"chosen": str(state.distributed_type), "has_fsdp_plugin": hasattr(state, "fsdp_plugin"),
              "backend": state.backend, "world": accelerator.num_processes}
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set from the YAML
    report["plugin"] = {"fsdp_version": plugin.fsdp_version, "cpu_ram_efficient_loading":
                        plugin.cpu_ram_efficient_loading, "reshard_after_forward": plugin.reshard_after_forward}
    state.fsdp_plugin = plugin

    model, processor, family = lora_model()
    data = halves(family, processor)
    report["numel"] = sum(p.numel() for p in model.parameters())
    model = fsdp2_prepare_model(accelerator, model)
    rank = accelerator.process_index
    report["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    report["trainable_local_numel"] = sum(p.to_local().numel() for p in model.parameters() if p.requires_grad)
    report["units"] = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    report["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    report["model_type"] = type(model).__name__
    report["ddp"] = isinstance(model, DistributedDataParallel) or any(
        hasattr(m, "reducer") for m in model.modules())
    report["losses"] = train(model, [[data[rank]]], accelerator.num_processes)
    report["final"] = trainable(model)
    save(model, adapter)
    return rank, report


if __name__ == "__main__":
    rank, report = run_fsdp(Path(sys.argv[2]))
    if rank == 0:
        with open(sys.argv[1], "w", encoding="utf-8") as fh:
            json.dump(report, fh)
