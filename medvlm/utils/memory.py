"""What a piece of work holds in memory beyond what was resident before it: peak resident set size.

The CPU build of torch keeps no allocator statistics (``torch.cuda.max_memory_allocated`` has no CPU
counterpart) and ``tracemalloc`` sees Python's allocator only, not tensor storage. So the peak is
read from the operating system: the process's resident set size (psutil), sampled every
``interval`` seconds by a thread while the work runs. A tensor large enough to matter (megabytes)
is written page by page while it is filled, which takes far longer than the interval, so its pages
are seen. Before the first sample, glibc's ``malloc_trim(0)`` hands freed heap pages back to the
system: otherwise memory an earlier piece of work freed but glibc kept would be reused without
showing up, and the work would look smaller than it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading

import psutil
import torch

GIB = 2**30
#: Share of the free memory a batch sized to memory plans to use (the rest: allocator slack,
#: fragmentation, and what the estimate leaves out).
BUDGET_FRACTION = 0.5


def free_memory(device: torch.device) -> int:
    """Bytes this process may plan for: free memory of its GPU, or on a CPU the machine's
    available memory divided among the processes of this node (``LOCAL_WORLD_SIZE``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(psutil.virtual_memory().available // local)


def memory_budget(device: torch.device) -> int:
    """Bytes one batch sized to memory may plan for: :data:`BUDGET_FRACTION` of :func:`free_memory`."""
    return int(BUDGET_FRACTION * free_memory(device))


def release_freed_memory() -> None:
    """Collect garbage and return freed heap memory to the system (glibc; a no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            pass


class PeakRSS:
    """Peak resident set size of this process while inside ``with``, sampled every ``interval`` s.

    ``start``: resident bytes on entry (after :func:`release_freed_memory`); ``peak``: the largest
    sample; ``added``: ``peak - start``, what the work held beyond what was already resident.
    """

    def __init__(self, interval: float = 0.005):
        self.proc, self.interval = psutil.Process(), interval
        self.start = self.peak = 0

    def __enter__(self) -> PeakRSS:
        release_freed_memory()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def added(self) -> int:
        return self.peak - self.start

    @property
    def added_gib(self) -> float:
        return self.added / GIB
