"""What a block of work costs: wall time, peak GPU memory and peak host memory (``benchmarks/prune_cost.py``)."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class RssSampler:
    """Peak resident set size of this process while a block runs (CPU memory has no peak reset).

    A thread polls /proc/self/statm; torch kernels release the GIL, so polls land during them.
    Only Linux; elsewhere peak is None.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = page_size()
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except (OSError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.rss()
            if now is not None:
                self.peak = max(self.peak, now)
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.start = self.rss()
        self.peak = self.start or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = self.rss()
        if end is not None:
            self.peak = max(self.peak, end)

    @property
    def delta(self) -> int | None:
        return None if self.start is None else self.peak - self.start


def page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


def release_memory(device: torch.device) -> None:
    """Free what the last row left, so the next row's baseline is clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    if platform.system() == "Linux":
        try:  # return freed heap to the OS, else the next row's RSS baseline includes it
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


@dataclass
class Measured:
    seconds: float = 0.0
    gpu_peak: int | None = None  # CUDA: max allocated during the block, above what was allocated before
    rss_growth: int | None = None  # host: peak resident set size during the block minus before it
    result: object = None


@contextmanager
def measure(device: torch.device):
    """Wall time (synchronized on CUDA), peak GPU memory and peak host RSS growth of the block."""
    out = Measured()
    release_memory(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)  # per row
        base = torch.cuda.memory_allocated(device)
    with RssSampler() as rss:
        start = time.perf_counter()
        yield out
        if cuda:
            torch.cuda.synchronize(device)
        out.seconds = time.perf_counter() - start
    out.rss_growth = rss.delta
    if cuda:
        out.gpu_peak = torch.cuda.max_memory_allocated(device) - base


def timed(device: torch.device, fn, /, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under :func:`measure`; an exception becomes the row's error, not the run's end."""
    with measure(device) as m:
        try:
            m.result = fn(*args, **kwargs)
            error = None
        except Exception as exc:  # noqa: BLE001  (report it in the table, go on with the other rows)
            error = f"{type(exc).__name__}: {exc}"
    return m, error
