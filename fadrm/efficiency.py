"""What each stage costs: wall time, peak memory, FLOPs and achieved FLOP/s.

Peak memory is the process resident set on CPU (sampled from /proc while the stage runs,
since ``ru_maxrss`` never goes down between stages) and ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import copy
import os
import resource
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StageMeter:
    """Context manager measuring seconds and peak memory of a block."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device = device
        self.interval = interval
        self.seconds = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __enter__(self) -> StageMeter:
        self._peak = rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.init()  # the memory statistics refuse a device whose CUDA context does not exist yet
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, rss_bytes()) / 2**20


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward and backward, as torch's counter sees them)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def flops_per_sample(model: torch.nn.Module, resolution: int, device: torch.device, train: bool = False) -> int:
    """FLOPs of one image through ``model`` (forward, plus backward when ``train``).

    Counted on a copy, so the model's BatchNorm statistics and gradients are left alone.
    """
    probe = copy.deepcopy(model).train(train)
    x = torch.zeros(2, 3, resolution, resolution, device=device)

    def step() -> None:
        out = probe(x)
        if train:
            out.float().sum().backward()

    with torch.set_grad_enabled(train):
        return count_flops(step) // 2
