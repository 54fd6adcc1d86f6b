"""Stage timers: wall clock with device synchronization, so a stage's time is its own."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    """Collects milliseconds per named stage for one control step.

    CPU: perf_counter. GPU: CUDA events around each stage (the GPU's own clock), with a
    synchronize at each boundary so asynchronous kernels are charged to the stage that launched
    them (a sync is cheap next to a 7 B forward pass).
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
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                end.record()
                end.synchronize()
                ms = begin.elapsed_time(end)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            self.ms[name] = self.ms.get(name, 0.0) + ms

    def move(self, source: str, dest: str, ms: float) -> None:
        """Charge `ms` measured inside stage `source` to `dest` instead (e.g. a pruning
        method's scoring, which runs inside the prefill, to "prune")."""
        self.ms[source] = self.ms.get(source, 0.0) - ms
        self.ms[dest] = self.ms.get(dest, 0.0) + ms

    def finish(self) -> dict[str, float]:
        self._sync()
        self.ms["total"] = (time.perf_counter() - self._start) * 1e3
        return dict(self.ms)
