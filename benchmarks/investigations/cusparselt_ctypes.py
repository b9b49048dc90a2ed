"""cuSPARSELt through ctypes, with plans made once and reused (used by ``cusparselt_prefill.py``).

At prefill an expert sees hundreds of tokens and the product is compute-bound, where only the
sparse tensor cores (``mma.sp``, which Triton does not expose) do less work than dense.
``torch._cslt_sparse_mm`` reaches them through cuSPARSELt but builds a new plan on every call,
which costs more CPU time than an expert's product takes on the GPU. This module calls the library (the copy torch's CUDA wheels
install) through ``ctypes`` with one plan per (out, in, rows) shape, kept for the process, so a
product costs one ``cusparseLtMatmul`` launch. Weights are compressed by ``torch._cslt_compress``
(same descriptor: row-major ``[out, in]``, bf16/fp16, 2:4); the caller keeps them contiguous.

``out.T[N, M] = W[N, K] @ x[M, K].T`` is cuSPARSELt's ``D = A @ B`` with ``A = W`` (structured,
row-major), ``B = x.T`` (a column-major view of ``x``) and ``D`` row-major: no operand is copied,
and the caller reads ``out`` as the transpose (with a column-major ``D``, i.e. ``out`` itself,
the library picked a slower kernel on an H100).
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache

import torch

_CUDA_R = {torch.bfloat16: 14, torch.float16: 2}  # cudaDataType
_ORDER_COL, _ORDER_ROW = 1, 2  # cusparseOrder_t
_COMPUTE_32F = 2  # cusparseComputeType (cuSPARSELt >= 0.6)
_STRUCT = 1024  # bytes reserved per opaque cuSPARSELt struct (the 0.8 headers use 512)


class CuSparseLtError(RuntimeError):
    """cuSPARSELt is missing or refused a call."""


@lru_cache(maxsize=1)
def _library():
    root = os.path.dirname(os.path.dirname(torch.__file__))
    candidates = sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcusparseLt.so*"), recursive=True))
    candidates += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcusparseLt*.so*")))
    for path in [*candidates, "libcusparseLt.so.0"]:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CuSparseLtError(f"cuSPARSELt {what} failed with status {status}")


def _struct():
    return ctypes.create_string_buffer(_STRUCT)


@lru_cache(maxsize=None)
def _handle(device: int):
    lib = _library()
    if lib is None:
        raise CuSparseLtError("libcusparseLt was not found; install torch's CUDA wheel (it ships nvidia-cusparselt)")
    with torch.cuda.device(device):
        handle = _struct()
        _check(lib.cusparseLtInit(handle), "init")
    return handle


class _Plan:
    """Descriptors, plan and workspace of one product shape; alive as long as the cache holds it."""

    def __init__(self, device: int, n: int, k: int, m: int, ld: int, dtype: torch.dtype):
        lib, handle = _library(), _handle(device)
        kind = _CUDA_R[dtype]
        self.a, self.b, self.c, self.matmul, self.alg, self.plan = (_struct() for _ in range(6))
        i64 = ctypes.c_int64
        _check(
            lib.cusparseLtStructuredDescriptorInit(
                handle, self.a, i64(n), i64(k), i64(k), ctypes.c_uint32(16), kind, _ORDER_ROW, 0
            ),
            "structured descriptor",
        )
        _check(
            lib.cusparseLtDenseDescriptorInit(
                handle, self.b, i64(k), i64(m), i64(k), ctypes.c_uint32(16), kind, _ORDER_COL
            ),
            "dense descriptor (x)",
        )
        _check(
            lib.cusparseLtDenseDescriptorInit(
                handle, self.c, i64(n), i64(m), i64(ld), ctypes.c_uint32(16), kind, _ORDER_ROW
            ),
            "dense descriptor (out)",
        )
        _check(
            lib.cusparseLtMatmulDescriptorInit(handle, self.matmul, 0, 0, self.a, self.b, self.c, self.c, _COMPUTE_32F),
            "matmul descriptor",
        )
        _check(lib.cusparseLtMatmulAlgSelectionInit(handle, self.alg, self.matmul, 0), "algorithm selection")
        _check(lib.cusparseLtMatmulPlanInit(handle, self.plan, self.matmul, self.alg), "plan")
        size = ctypes.c_size_t()
        _check(lib.cusparseLtMatmulGetWorkspace(handle, self.plan, ctypes.byref(size)), "workspace size")
        self.workspace = torch.empty(max(1, size.value), dtype=torch.uint8, device=f"cuda:{device}")
        self.handle = handle


@lru_cache(maxsize=512)
def _plan(device: int, n: int, k: int, m: int, ld: int, dtype: torch.dtype) -> _Plan:
    return _Plan(device, n, k, m, ld, dtype)


def linear_t_into(out_t: torch.Tensor, x: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """``out_t[N, M] = W @ x.T`` for the compressed ``W`` (``[N, K]``): ``x`` ``[M, K]`` contiguous,
    ``out_t`` row-major with any row stride (a column block of a wider matrix)."""
    m, k = x.shape
    n = out_t.shape[0]
    if out_t.shape[1] != m or out_t.stride(1) != 1 or not x.is_contiguous():
        raise ValueError(
            f"linear_t_into needs contiguous x [M, K] and row-major out_t [N, M], got {tuple(x.shape)} and {tuple(out_t.shape)}"
        )
    plan = _plan(x.device.index or 0, n, k, m, out_t.stride(0), x.dtype)
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
    status = _library().cusparseLtMatmul(
        plan.handle,
        plan.plan,
        ctypes.byref(alpha),
        ctypes.c_void_p(compressed.data_ptr()),
        ctypes.c_void_p(x.data_ptr()),
        ctypes.byref(beta),
        ctypes.c_void_p(out_t.data_ptr()),
        ctypes.c_void_p(out_t.data_ptr()),
        ctypes.c_void_p(plan.workspace.data_ptr()),
        ctypes.byref(stream),
        1,
    )
    _check(status, "matmul")
    return out_t
