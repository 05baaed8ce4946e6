"""How many questions one ``generate`` call takes: from a memory budget, then halved on out-of-memory.

A fixed batch does not fit real shapes: PaliGemma-3B-448 with five samples per question and 32
questions is 160 sequences of about 1,040 tokens, and one MLP of the prefill asks for several GB.
``batch_size="auto"`` therefore starts from :func:`auto_batch_size`, an estimate of the memory one
generated row needs (read from the model's shapes through the family) against a budget (free
GPU memory, or on a CPU the memory available to this process's share of the machine), and
:func:`run_batches` halves the batch whenever ``generate`` raises an out-of-memory error.

What the fallback can and cannot catch. It uses accelerate's ``find_executable_batch_size``,
whose test (``accelerate.utils.memory.should_reduce_batch_size``, accelerate 1.16) recognises the
CUDA/XPU/MPS messages and the CPU allocator's ``RuntimeError`` "DefaultCPUAllocator: can't
allocate memory". On a CPU that error is raised only when ``malloc`` itself refuses (a request
larger than Linux's overcommit heuristic allows, or under ``ulimit -v``); a request that is
granted and then touched beyond the machine's memory ends in the kernel's OOM killer (SIGKILL),
which no Python code sees. So on a CPU the budget estimate is what keeps a batch in memory, and
the fallback only covers refused allocations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import find_executable_batch_size

from medvlm.models.base import ModelFamily
from medvlm.utils.memory import memory_budget

logger = logging.getLogger(__name__)

#: Largest batch ``auto`` starts from (questions per generate call): beyond it a GPU gains little
#: and a CPU nothing, while a failed attempt costs a whole batch.
MAX_AUTO_BATCH = 64


def parse_batch_size(value: int | str) -> int | str:
    """``"auto"`` or a positive integer (from a CLI flag or a YAML key)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise ValueError(f"batch size must be 'auto' or an integer >= 1, got {value!r}")
    return number


def row_bytes(model: torch.nn.Module, family: ModelFamily, prompt_tokens: int, image_tokens: int,
              max_new_tokens: int) -> int:
    """Estimated bytes one generated row holds at its peak, beyond the weights.

    Counted: the key/value cache of every decoder layer over prompt + answer; the widest
    activations of one prefill layer (the MLP's gate, up and activated outputs, four model-width
    tensors, and one head-by-token-by-token score matrix, which eager attention materialises);
    the vision tower's widest layer over its image tokens (MLP taken as 4x its width and heads of
    64 channels, as in SigLIP and CLIP, and as the diagnostics' cost model assumes); the last
    position's logits in float32, twice (logits and probabilities). ``generate`` keeps only the
    last position's logits (``logits_to_keep``).
    """
    dims = family.dimensions(model)
    n_heads, n_kv, head_dim = family.head_layout(model)
    layers = len(family.decoder_layers(model))
    size = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    seq = prompt_tokens + max_new_tokens
    kv_cache = 2 * layers * n_kv * head_dim * seq * size
    prefill = prompt_tokens * (3 * dims["d_mlp"] + 4 * dims["d_model"]) * size + n_heads * prompt_tokens ** 2 * size
    vision_heads = max(1, dims["d_vision"] // 64)
    vision = image_tokens * (2 * 4 * dims["d_vision"] + 4 * dims["d_vision"]) * size \
        + vision_heads * image_tokens ** 2 * size
    logits = 2 * dims["vocab"] * 4
    return int(kv_cache + prefill + vision + logits)


def auto_batch_size(model: torch.nn.Module, processor, family: ModelFamily, images: Sequence[Any],
                    questions: Sequence[str], *, rows_per_question: int, max_new_tokens: int,
                    budget_bytes: int | None = None, resized: bool = True) -> tuple[int, dict[str, Any]]:
    """Questions per ``generate`` call that fit ``budget_bytes`` (default: :func:`medvlm.utils.memory.memory_budget`,
    half the free memory), and the numbers behind it. The longest question is the one measured
    (its prompt, image tokens included, built by the family)."""
    longest = max(range(len(questions)), key=lambda i: len(questions[i]))
    batch = family.generation_batch(processor, [images[longest]], [questions[longest]], prepared=resized)
    prompt_tokens = int(batch["input_ids"].shape[1])
    image_tokens = family.vision_tokens(model, batch)
    per_row = row_bytes(model, family, prompt_tokens, image_tokens, max_new_tokens)
    device = next(model.parameters()).device
    budget = memory_budget(device) if budget_bytes is None else int(budget_bytes)
    fits = budget // max(1, per_row * rows_per_question)
    chosen = int(max(1, min(fits, MAX_AUTO_BATCH, len(questions))))
    if fits < 1:
        logger.warning("one question (%d rows of ~%.1f MB each) exceeds the generation memory budget of %.1f MB; "
                       "trying batch 1", rows_per_question, per_row / 2**20, budget / 2**20)
    return chosen, {"budget_mb": round(budget / 2**20, 1), "row_mb": round(per_row / 2**20, 3),
                    "prompt_tokens": prompt_tokens, "rows_per_question": rows_per_question}


@dataclass
class BatchRecord:
    """Which batch a generation used: the size it started from, how it was chosen, the size
    that finished the work, and each out-of-memory halving."""

    requested: int | str
    start: int = 0
    used: int = 0
    halvings: list[int] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "start": self.start, "used": self.used,
                "oom_halvings": list(self.halvings), **({"estimate": self.estimate} if self.estimate else {})}


def run_batches(n: int, start: int, run_batch: Callable[[int, int], int], record: BatchRecord,
                progress: Callable[[int], None] | None = None, *, what: str = "generation",
                unit: str = "questions") -> None:
    """Call ``run_batch(lo, hi)`` over ``[0, n)`` in batches of ``start``; on an out-of-memory
    error (see the module docstring for which) the failed batch is redone at half the size and the
    work continues from there. Finished batches are kept. ``run_batch`` returns how many
    questions it completed (``hi - lo``)."""
    done = 0
    size = start

    def halve() -> int:
        nonlocal size
        record.halvings.append(size)
        logger.warning("%s ran out of memory at %d %s per batch; retrying at %d", what, size, unit, size // 2)
        size //= 2
        return size

    def loop(batch_size: int) -> int:
        nonlocal done
        while done < n:
            step = run_batch(done, min(n, done + batch_size))
            done += step
            if progress is not None:
                progress(step)
        return batch_size

    # accelerate's default shrinks by 10% per failure; halving reaches a fitting size in log2 steps
    record.start = start
    record.used = find_executable_batch_size(loop, starting_batch_size=start, reduce_batch_size_fn=halve)()
