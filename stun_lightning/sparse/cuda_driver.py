"""The two CUDA driver calls our NVRTC kernels need, through ``ctypes``: launching a kernel on the
current stream, and describing a matrix to the Tensor Memory Accelerator (a tensor map).

Both functions come from the driver library that torch already loaded (looked up once).
``torch.cuda._compile_kernel``'s own launcher opens the library (``ctypes.CDLL``) on every call: 48
against 29 us of CPU per call alone, and a compiled Qwen3-sized MoE block at 2048 tokens (two
calls) spent 1420 against 1004 us of CPU per call, more than its 0.9 ms on the GPU
(``benchmarks/launch_overhead.py``).
"""

from __future__ import annotations

import ctypes
import functools

import torch

#: CUtensorMapDataType and CUtensorMapL2promotion values (cuda.h)
_BFLOAT16, _L2_PROMOTION_128B = 9, 2


class TensorMap:
    """A ``CUtensorMap`` (128 bytes, 64-byte aligned) held on the host, passed to a kernel by value
    (a ``const __grid_constant__`` parameter)."""

    __slots__ = ("_buffer", "address")

    def __init__(self):
        self._buffer = ctypes.create_string_buffer(128 + 64)
        self.address = (ctypes.addressof(self._buffer) + 63) & ~63


@functools.cache
def _driver(name: str, argtypes: tuple):
    fn = getattr(torch.cuda._utils._get_gpu_runtime_library(), name)
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn


_LAUNCH_ARGS = (ctypes.c_void_p,) + (ctypes.c_uint,) * 7 + (ctypes.c_void_p,) * 3
_ENCODE_ARGS = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32) + (ctypes.c_void_p,) * 5 + (ctypes.c_int,) * 4


def launch_kernel(kernel, grid, block, shared_mem: int, args) -> None:
    """Launch a kernel of ``torch.cuda._compile_kernel`` on the current stream; ``args``: tensors
    (their data pointers), ints and :class:`TensorMap` s."""
    held, addresses = [], []
    for a in args:
        if isinstance(a, TensorMap):
            addresses.append(a.address)
            continue
        h = ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a)
        held.append(h)
        addresses.append(ctypes.addressof(h))
    params = (ctypes.c_void_p * len(addresses))(*addresses)
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())  # as inductor's launchers get it
    err = _driver("cuLaunchKernel", _LAUNCH_ARGS)(kernel.func, *grid, *block, shared_mem, stream, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernel failed with CUDA error {err}")


def tensor_map_2d(a: torch.Tensor, box_cols: int, box_rows: int, swizzle_bytes: int) -> TensorMap:
    """A tensor map over ``a`` ``[rows, cols]`` (bf16, contiguous, 16-byte aligned) whose boxes are
    ``box_rows`` x ``box_cols``, written to shared memory with the 32, 64 or 128-byte swizzle (the
    XOR of the 16-byte chunk index with the row within each 8 x ``swizzle_bytes`` block, which TMA
    applies by shared-memory address)."""
    rows, cols = a.shape
    if a.dtype != torch.bfloat16 or not a.is_contiguous() or a.data_ptr() % 16:
        raise ValueError(f"a tensor map needs a contiguous, 16-byte aligned bf16 matrix, got {a.dtype} {tuple(a.shape)}")
    tensor_map = TensorMap()
    dims = (ctypes.c_uint64 * 2)(cols, rows)
    strides = (ctypes.c_uint64 * 1)(cols * a.element_size())
    box = (ctypes.c_uint32 * 2)(box_cols, box_rows)
    element_strides = (ctypes.c_uint32 * 2)(1, 1)
    swizzle = {32: 1, 64: 2, 128: 3}[swizzle_bytes]
    err = _driver("cuTensorMapEncodeTiled", _ENCODE_ARGS)(
        tensor_map.address, _BFLOAT16, 2, a.data_ptr(), dims, strides, box, element_strides, 0, swizzle, _L2_PROMOTION_128B, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUDA error {err} for a {tuple(a.shape)} matrix, boxes {box_rows} x {box_cols}")
    return tensor_map
