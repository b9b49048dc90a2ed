"""Launching our NVRTC kernels on the current stream, through the driver's ``cuLaunchKernel`` (``ctypes``).

The function comes from the driver library that torch already loaded (looked up once).
``torch.cuda._compile_kernel``'s own launcher opens the library (``ctypes.CDLL``) on every call: 48
against 29 us of CPU per call alone, and a compiled Qwen3-sized MoE block at 2048 tokens (two
calls) spent 1420 against 1004 us of CPU per call, more than its 0.9 ms on the GPU
(``benchmarks/investigations/launch_overhead.py``).
"""

from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def _cu_launch_kernel():
    fn = torch.cuda._utils._get_gpu_runtime_library().cuLaunchKernel
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    return fn


def launch_kernel(kernel, grid, block, shared_mem: int, args) -> None:
    """Launch a kernel of ``torch.cuda._compile_kernel`` on the current stream; ``args``: tensors
    (their data pointers) and ints."""
    held = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    params = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())  # as inductor's launchers get it
    err = _cu_launch_kernel()(kernel.func, *grid, *block, shared_mem, stream, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernel failed with CUDA error {err}")
