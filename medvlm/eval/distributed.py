"""Evaluation across processes: each process answers a contiguous shard, results come back in order.

Under ``accelerate launch`` with N processes (``WORLD_SIZE`` > 1), every process calls the same
evaluation: :func:`process_shard` gives it a contiguous block of the questions (the first
``n % N`` processes one more, accelerate's ``split_between_processes`` rule), it generates those,
and :func:`gather` (accelerate's ``gather_object``, an ``all_gather_object`` over the process
group) returns every process's results in rank order, which is the original order. The main
process alone scores and writes. Greedy answers do not depend on the shard, and sampled answers
are seeded per question (:mod:`medvlm.eval.sampling`), so N processes write the predictions one
process would. In a single process nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medvlm.eval.batching import BatchRecord
from medvlm.eval.generate import generate_answers
from medvlm.models.base import ModelFamily
from medvlm.utils.distributed import world


@dataclass(frozen=True)
class ProcessShard:
    """This process's block ``[start, stop)`` of ``n`` questions, and its place among the processes."""

    rank: int
    world_size: int
    start: int
    stop: int

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block of ``n`` items for ``rank``: sizes differ by at most one, larger first
    (the rule of accelerate 1.16 ``PartialState.split_between_processes``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


def process_shard(n: int) -> ProcessShard:
    """This process's shard of ``n`` questions."""
    rank, size = world()
    return ProcessShard(rank, size, *shard_bounds(n, rank, size))


def barrier(shard: ProcessShard) -> None:
    """Every process waits for the others (nothing in a single process)."""
    if shard.world_size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def gather(shard: ProcessShard, local: Any) -> list[Any]:
    """Every process's ``local``, in rank order (every process receives the list)."""
    if shard.world_size == 1:
        return [local]
    from accelerate.utils import gather_object

    return gather_object([local])


@dataclass
class ShardedAnswers:
    """Answers to every question in the original order, and how the processes made them."""

    answers: list
    latencies: list[float]
    questions_per_process: list[int]
    batches: list[dict[str, Any]]     # one BatchRecord.as_dict() per process, with its "seconds"
    seconds: float = 0.0              # wall time of the pass (its start to the gathered answers)

    @property
    def world_size(self) -> int:
        return len(self.questions_per_process)


def generate_sharded(model, processor, family: ModelFamily, image_at: Callable[[int], np.ndarray],
                     questions: Sequence[str], **gen_kwargs) -> ShardedAnswers:
    """:func:`~medvlm.eval.generate.generate_answers` over this process's shard of ``questions``
    (``image_at(i)`` reads question ``i``'s image; only the shard's are read), gathered in order.
    Every process of the group must call it with the same questions. ``question_ids`` are the
    global indices, so sampled answers are those of one process."""
    shard = process_shard(len(questions))
    barrier(shard)  # the processes start together, so the pass's wall time is the generation's
    t0 = time.perf_counter()
    latencies: list[float] = []
    record = BatchRecord(requested=gen_kwargs.get("batch_size", "auto"))
    local = generate_answers(model, processor, family, [image_at(i) for i in shard.indices],
                             [questions[i] for i in shard.indices], question_ids=shard.indices,
                             latencies=latencies, batch_record=record, **gen_kwargs)
    mine = {**record.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
    parts = gather(shard, (local, latencies, len(shard.indices), mine))
    return ShardedAnswers(answers=[a for part in parts for a in part[0]],
                          latencies=[t for part in parts for t in part[1]],
                          questions_per_process=[part[2] for part in parts], batches=[part[3] for part in parts],
                          seconds=round(time.perf_counter() - t0, 3))


def generation_summary(passes: Mapping[str, ShardedAnswers]) -> dict[str, Any]:
    """What ``metrics.json`` and ``manifest.json`` say about generation: the number of processes,
    the questions each generated (of the first pass: the evaluated set), the batch each process
    used per pass (``greedy``, ``samples``, ``paraphrases``), and per pass the details (questions
    per process, the pass's wall time, and per process how its batch was chosen, out-of-memory
    halvings and its own generation seconds)."""
    first = next(iter(passes.values()))
    return {"world_size": first.world_size, "questions_per_process": list(first.questions_per_process),
            "batch_size": {name: [b["used"] for b in p.batches] for name, p in passes.items()},
            "passes": {name: {"questions_per_process": list(p.questions_per_process), "seconds": p.seconds,
                              "batches": list(p.batches)} for name, p in passes.items()}}
