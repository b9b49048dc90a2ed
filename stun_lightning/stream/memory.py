"""Host memory while streaming: hand freed layers back to the operating system."""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
#: glibc's own starting threshold; fixing it turns off the sliding threshold that outgrows it
MMAP_THRESHOLD = 128 * 1024


def mmap_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc only (elsewhere nothing, False): allocations of ``threshold`` bytes or more are mmapped,
    so a freed layer's tensors go back to the OS. Without it glibc raises its mmap threshold each
    time a large block is freed (up to 32 MiB), later tensors of a few hundred KiB come from the heap,
    and the heap keeps what they free: RSS climbed with every layer read (1.1 GB over a 0.44 GB
    model, ``benchmarks/results/stream_prune_cpu.md``). Returns whether the setting took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return False
    # one heap for all threads: the lockstep candidate threads of a streamed ``auto`` each grew
    # their own arena, holding freed blocks at the peak (tests/test_stream_memory.py, issue 26)
    libc.mallopt(M_ARENA_MAX, 1)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
