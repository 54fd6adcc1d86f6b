"""Stage timers: wall clock with device synchronization, so a stage's time is its own."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    """Collects milliseconds per named stage for one control step.

    On a GPU, each stage boundary synchronizes so asynchronous kernels are charged to the stage
    that launched them (the cost of a sync is tiny next to a 7 B forward pass).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def finish(self) -> dict[str, float]:
        self._sync()
        self.ms["total"] = (time.perf_counter() - self._start) * 1e3
        return dict(self.ms)
