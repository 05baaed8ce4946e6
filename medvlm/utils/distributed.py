"""Which process this is under ``accelerate launch``, and a main-process-first barrier.

Every room that splits work across processes (evaluation shards, the prepared-image cache, the
demo base) asks here, so a CPU machine's processes are joined the same way everywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch


def _cpu_only() -> bool:
    """No accelerator to run on (or ``accelerate launch --cpu`` / ``use_cpu: true``)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:
        return not torch.cuda.is_available()
    try:
        return accelerator.current_accelerator() is None
    except RuntimeError:  # torch 2.6 raises when there is none
        return True


def world() -> tuple[int, int]:
    """(rank, world size): accelerate's process state under several processes, else (0, 1).

    On a machine without an accelerator, accelerate's ``PartialState()`` treats the processes
    that ``accelerate launch --multi_gpu`` starts as independent single processes unless it is
    told ``cpu=True`` (then it joins them over gloo, as the Trainer does); so the first call here
    says so. A state already set up (by the Trainer) is reused as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only())
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but accelerate joined {state.num_processes} "
                           f"process(es) ({state.distributed_type}); launch with `accelerate launch --multi_gpu "
                           "--num_processes N` (on a CPU machine too) or recipes/accelerate/cpu_2proc.yaml")
    return state.process_index, state.num_processes


def main_process_first():
    """A context in which the main process runs first and the others wait (building a mix or the
    phantom once); nothing in a single process."""
    if world()[1] == 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


