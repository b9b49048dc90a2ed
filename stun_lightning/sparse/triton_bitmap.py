"""Triton kernel for decode: routed tokens times bitmap-compressed expert weights on the CUDA cores.

At decode (1-32 tokens) an expert matrix times a few activations is bound by the weight bytes, so
the kernel reads only the routed experts' bitmap words, tile offsets and packed nonzeros
(:mod:`.bitmap`) and never writes a dense tile. One program takes a block of ``BLOCK_M`` (token,
expert) pairs of one expert (the layout of :func:`.experts.align_pairs`) by ``BLOCK_N`` output
rows, and walks the input in steps of ``TILES`` bitmap words per row:

* load the words ``[BLOCK_N, TILES]`` and their offsets; expand each word's 64 bits;
* the rank of a set bit among the lower bits of its word (a prefix count, ``tl.cumsum``) plus the
  tile's offset is the index of its value in the expert's packed values: load those (masked by
  the bits, so only nonzeros move), multiply by the activations, accumulate in float32.

The block's real rows are taken one at a time (a further row re-reads the strip from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitmap import TILE
from .triton_decode import autotune_candidates


def _config(block_n: int, tiles: int, warps: int, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "TILES": tiles}, num_warps=warps, num_stages=stages)


#: candidates the autotuner times per (N, K, block rows); untuned guesses (the first is what the
#: GPU tests run), to be replaced by the winners of benchmarks/sparse_kernels.py
CONFIGS = [
    _config(8, 2, 4),
    _config(4, 4, 4),
    _config(16, 1, 4),
    _config(8, 4, 8),
    _config(2, 8, 4),
    _config(8, 2, 4, stages=3),
]


def fits(a: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernel takes these activations and values (float dtypes, matching)."""
    return a.dtype == values.dtype and values.dtype in (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def bitmap_decode_kernel(
    a_ptr,
    bm_ptr,
    v_ptr,
    off_ptr,
    ids_ptr,
    be_ptr,
    c_ptr,
    N,
    K,
    T,
    n_pairs,
    rows_per_a,
    rows_bucket,
    stride_am,
    stride_be,
    stride_bn,
    stride_ve,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES: tl.constexpr,
    WORD: tl.constexpr,
):
    """``bm_ptr`` / ``off_ptr``: ``[E, N, T]`` int64 words / int32 offsets (same strides);
    ``v_ptr``: ``[E, max_nnz]`` packed values; ``a_ptr``: ``[M, K]``; ``c_ptr``: ``[n_pairs, N]``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(be_ptr + pid_m)
    if e < 0:  # a block past the routed experts
        return
    e = e.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_t = tl.arange(0, TILES)
    offs_j = tl.arange(0, WORD)
    bit = tl.full((WORD,), 1, tl.int64) << offs_j.to(tl.int64)
    row_ptrs = e * stride_be + offs_n[:, None].to(tl.int64) * stride_bn
    values = v_ptr + e * stride_ve
    ids = ids_ptr + pid_m * BLOCK_M
    n_valid = tl.sum((tl.load(ids + tl.arange(0, BLOCK_M)) < n_pairs).to(tl.int32))
    for r in range(0, n_valid):
        pair = tl.load(ids + r)
        x_row = a_ptr + (pair // rows_per_a).to(tl.int64) * stride_am
        acc = tl.zeros((BLOCK_N, TILES, WORD), dtype=tl.float32)
        for t0 in range(0, T, TILES):
            t = t0 + offs_t
            ok = n_ok[:, None] & (t[None, :] < T)
            word = tl.load(bm_ptr + row_ptrs + t[None, :], mask=ok, other=0)
            start = tl.load(off_ptr + row_ptrs + t[None, :], mask=ok, other=0)
            present = (word[:, :, None] & bit[None, None, :]) != 0
            count = present.to(tl.int32)
            rank = tl.cumsum(count, axis=2) - count
            w = tl.load(values + start[:, :, None] + rank, mask=present, other=0.0).to(tl.float32)
            col = t[:, None] * WORD + offs_j[None, :]
            x = tl.load(x_row + col, mask=col < K, other=0.0).to(tl.float32)
            acc += w * x[None, :, :]
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(c_ptr + pair.to(tl.int64) * stride_cm + offs_n, out.to(c_ptr.dtype.element_ty), mask=n_ok)


decode_kernel = triton.autotune(configs=autotune_candidates(CONFIGS), key=["N", "K", "BLOCK_M", "rows_bucket"])(
    bitmap_decode_kernel
)


def launch_bitmap_decode(
    a,
    bitmap,
    values,
    offsets,
    sorted_ids,
    block_expert,
    rows_per_a: int,
    block_m: int,
    in_features: int,
    *,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``out[s] = a[s // rows_per_a] @ W[expert(s)].T`` from bitmap storage (see the module docstring)."""
    _, n, t = (int(d) for d in bitmap.shape)
    n_pairs = a.shape[0] * rows_per_a
    a = a.contiguous()
    bitmap, offsets, values = bitmap.contiguous(), offsets.contiguous(), values.contiguous()
    if values.shape[-1] == 0:  # every expert empty: keep the pointer arithmetic in bounds
        values = values.new_zeros(values.shape[0], 1)
    out = torch.empty((n_pairs, n), dtype=a.dtype, device=a.device)
    rows_bucket = min(16, -(-n_pairs // max(1, block_expert.numel())))
    args = (
        a,
        bitmap,
        values,
        offsets,
        sorted_ids,
        block_expert,
        out,
        n,
        in_features,
        t,
        n_pairs,
        rows_per_a,
        rows_bucket,
        a.stride(0),
        bitmap.stride(0),
        bitmap.stride(1),
        values.stride(0),
        out.stride(0),
    )
    if config is None:
        grid = lambda meta_: (block_expert.numel(), triton.cdiv(n, meta_["BLOCK_N"]))  # noqa: E731
        decode_kernel[grid](*args, BLOCK_M=block_m, WORD=TILE)
    else:
        grid = (block_expert.numel(), triton.cdiv(n, config.kwargs["BLOCK_N"]))
        bitmap_decode_kernel[grid](
            *args, BLOCK_M=block_m, WORD=TILE, num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs
        )
    return out
