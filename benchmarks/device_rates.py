"""Timing on a device, and the two rates a speed is held against: copy bandwidth and bf16 matmul rate.

Shared by the GPU benchmarks (``inference.py``, ``sparse_kernels.py``, ``mma_rates.py``,
``cusparselt_prefill.py``); the first two give a time as a fraction of its floor, max(bytes / copy
bandwidth, FLOPs / matmul rate), with the rates measured in the same run.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def no_cuda(script: str) -> bool:
    """True (after saying so on stderr) when there is no CUDA GPU for ``script``."""
    if torch.cuda.is_available():
        return False
    print(f"{script} needs a CUDA GPU", file=sys.stderr)
    return True


def make_timer(device: str):
    """us per call: triton's do_bench median on CUDA (L2 flushed between calls), a plain median on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    def cpu_timer(fn):
        fn()
        times, deadline = [], time.perf_counter() + 0.05
        while len(times) < 3 or (len(times) < 50 and time.perf_counter() < deadline):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    return cpu_timer


def measured_rates(device: str, timer=None) -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), measured now with ``timer``
    (us per call; default :func:`make_timer`): 1 GiB and 8192^3 on CUDA, 64 MiB and 512^3 elsewhere."""
    timer = timer or make_timer(device)
    n, m = (2**30, 8192) if device == "cuda" else (2**26, 512)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * n / (timer(lambda: dst.copy_(src)) * 1e-6)
    a = torch.randn(
        m, m, device=device, dtype=torch.bfloat16
    )  # a @ a: one RNG draw (sparse_kernels.py draws its seeded weights after)
    return copy, 2 * m**3 / (timer(lambda: a @ a) * 1e-6)
