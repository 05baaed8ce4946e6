"""A stage (``recipes/stage1.py``'s ``run_stage``) with a callback that records, after the first step,
what accelerate and the Trainer set up: ``python tests/stage_probe_worker.py PROBE.json <stage args>``
under ``accelerate launch`` (see ``tests/training/test_deepspeed_cpu.py``)."""

from __future__ import annotations

import json
import sys

from transformers import TrainerCallback

from medvlm.training.cli import parse_stage_config
from medvlm.training.stage import run_stage


class Probe(TrainerCallback):
    """After step 1: distributed type, model and optimizer classes, the fp32 optimizer partition
    this rank holds (DeepSpeed ZeRO) and the trainable parameter count."""

    def __init__(self, out: str):
        self.out = out

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        import torch.distributed as dist
        from accelerate.state import AcceleratorState

        inner = getattr(optimizer, "optimizer", optimizer)
        partitions = getattr(inner, "single_partition_of_fp32_groups", None)
        report = {"distributed_type": str(AcceleratorState().distributed_type), "world": dist.get_world_size(),
                  "optimizer": type(inner).__name__,
                  "fp32_partition": sum(p.numel() for p in partitions) if partitions else None,
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if dist.get_rank() == 0:
            with open(self.out, "w", encoding="utf-8") as fh:
                json.dump(report, fh)


if __name__ == "__main__":
    model_args, data_args, lora_args, stage_args = parse_stage_config(sys.argv[2:], "stage1")
    run_stage(model_args, data_args, lora_args, stage_args, callbacks=[Probe(sys.argv[1])])
