"""A forward or generate that runs out of memory above a batch size, as torch's CPU allocator does.

Shared by the tests of everything that halves its batch on out-of-memory (generation, occlusion, the
attention-knockout map): the patched call asks for ``rows << 44`` bytes when its batch has more than
``limit`` rows, a request no machine grants, so torch raises its real "can't allocate memory" error.
"""

from __future__ import annotations

import torch


def refuse_batches_above(monkeypatch, cls: type, method: str, limit: int) -> list[int]:
    """Patch ``cls.method`` (e.g. a model class's ``forward`` or ``generate``) to fail as a refused
    allocation when its ``input_ids`` hold more than ``limit`` rows; returns the list the batch size
    of every call is appended to."""
    original = getattr(cls, method)
    sizes: list[int] = []

    def needs_memory_per_row(self, *args, **kwargs):
        rows = int(kwargs["input_ids"].shape[0])
        sizes.append(rows)
        if rows > limit:
            torch.empty(rows << 44, dtype=torch.uint8)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, needs_memory_per_row)
    return sizes
