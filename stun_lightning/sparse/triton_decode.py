"""Triton kernel for decode: routed tokens times 2:4-compressed bf16 expert weights on the CUDA cores.

At decode an expert sees a few tokens, so the product is a matrix-vector product bound by the
weight bytes: the kernel must stream values + metadata at the memory's rate and do as little per
weight as it can. It therefore never builds a dense tile (no tensor cores, no shared-memory round
trip) and reads the weight in 8-input units that need no register shuffles:

* one ``int64`` word of values (the 4 kept bf16 values of two groups of 4 inputs) and one metadata
  byte (the two groups' nibbles) per unit, both tiles ``[BLOCK_N, BLOCK_K / 8]`` in one layout;
* a bf16 value becomes float32 by a shift or a mask of its 16 bits (no conversion instruction);
* each kept value multiplies ``x[4g + i]``, picked from the unit's 8 activations by its 2-bit
  position with two selects; the activations are stored unit-major first (``x[8u + j]`` at
  ``[j, u]``), so each of the 8 is one vector load per step.

Programs are laid out as the tensor-core kernel's (:mod:`.triton_kernel`): one block of ``BLOCK_M``
(token, expert) pairs of one expert by ``BLOCK_N`` outputs; a program loops over its block's real
rows one at a time, re-reading its weight strip from L2 for each further row (decode runs it for
one token per expert: :func:`.triton_kernel.uses_decode_kernel`). Small
``BLOCK_N`` (down to 2) gives enough programs to keep the memory busy when few experts are routed.
Needs bf16 values and ``in % 8 == 0``; :func:`fits` says whether a weight qualifies.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _config(block_n: int, block_k: int, warps: int, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


#: candidates the autotuner times per (N, K, pairs per expert): the winners of
#: ``benchmarks/sparse_kernels.py`` on an H100 (Mixtral and Qwen3-30B expert shapes, 1 token), and
#: the same with software pipelining (num_stages=3)
CONFIGS = [
    _config(4, 1024, 4),
    _config(8, 256, 2),
    _config(16, 256, 4),
    _config(32, 256, 8),
    _config(8, 256, 2, stages=3),
    _config(16, 256, 4, stages=3),
]


def autotune_candidates(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs``, or only the first with ``STUN_SPARSE_AUTOTUNE=0`` (no timing on first use: the
    GPU tests, which check every candidate on their own)."""
    return configs[:1] if os.environ.get("STUN_SPARSE_AUTOTUNE", "1") == "0" else configs


def fits(values: torch.Tensor) -> bool:
    """Whether the decode kernel takes these compressed values (bf16, input dimension % 8 == 0)."""
    return (
        values.dtype == torch.bfloat16
        and values.shape[-1] % 4 == 0
        and values.is_contiguous()
        and values.storage_offset() % 4 == 0
    )


@triton.jit
def _bf16_lo(w):
    return (w << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_hi(w):
    return (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _pick(i, xa, xb, xc):
    """``[xa, xb, xc][i]`` elementwise (``i`` in 0..2)."""
    return tl.where(i == 0, xa, tl.where(i == 1, xb, xc))


@triton.jit
def sparse24_decode_kernel(
    a_ptr,
    w_ptr,
    m_ptr,
    ids_ptr,
    be_ptr,
    c_ptr,
    N,
    K,
    n_pairs,
    rows_per_a,
    rows_bucket,
    stride_am,
    stride_aj,
    stride_we,
    stride_wn,
    stride_me,
    stride_mn,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """``a_ptr``: activations unit-major ``[M, 8, K/8]``; ``w_ptr``: values as int64 ``[E, N, K/8]``;
    ``m_ptr``: metadata ``[E, N, K/8]`` bytes."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(be_ptr + pid_m)
    if e < 0:  # a block past the routed experts
        return
    e = e.to(tl.int64)
    UNITS: tl.constexpr = BLOCK_K // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_u = tl.arange(0, UNITS)
    n_ok = offs_n < N
    w_ptrs = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_u[None, :]
    m_ptrs = m_ptr + e * stride_me + offs_n[:, None].to(tl.int64) * stride_mn + offs_u[None, :]
    n_units = K // 8
    ids = ids_ptr + pid_m * BLOCK_M
    n_valid = tl.sum((tl.load(ids + tl.arange(0, BLOCK_M)) < n_pairs).to(tl.int32))
    for r in range(0, n_valid):  # the block's real rows, one at a time
        pair = tl.load(ids + r)
        x_ptrs = a_ptr + (pair // rows_per_a).to(tl.int64) * stride_am + offs_u[None, :]
        acc = tl.zeros((BLOCK_N, UNITS), dtype=tl.float32)
        for u0 in range(0, n_units, UNITS):
            u_ok = offs_u[None, :] < n_units - u0
            if EVEN_N:
                w = tl.load(w_ptrs + u0, mask=u_ok, other=0)
                m = tl.load(m_ptrs + u0, mask=u_ok, other=0).to(tl.int32)
            else:
                w = tl.load(w_ptrs + u0, mask=u_ok & n_ok[:, None], other=0)
                m = tl.load(m_ptrs + u0, mask=u_ok & n_ok[:, None], other=0).to(tl.int32)
            xp = x_ptrs + u0
            x0 = tl.load(xp, mask=u_ok, other=0.0).to(tl.float32)
            x1 = tl.load(xp + stride_aj, mask=u_ok, other=0.0).to(tl.float32)
            x2 = tl.load(xp + 2 * stride_aj, mask=u_ok, other=0.0).to(tl.float32)
            x3 = tl.load(xp + 3 * stride_aj, mask=u_ok, other=0.0).to(tl.float32)
            x4 = tl.load(xp + 4 * stride_aj, mask=u_ok, other=0.0).to(tl.float32)
            x5 = tl.load(xp + 5 * stride_aj, mask=u_ok, other=0.0).to(tl.float32)
            x6 = tl.load(xp + 6 * stride_aj, mask=u_ok, other=0.0).to(tl.float32)
            x7 = tl.load(xp + 7 * stride_aj, mask=u_ok, other=0.0).to(tl.float32)
            lo = w.to(tl.int32)  # values of group 2u (low word), then group 2u + 1
            hi = (w >> 32).to(tl.int32)
            # first group: positions i0 = m & 3 (0..2), i1 = (m >> 2) & 3 (1..3); second group: m >> 4
            acc += _bf16_lo(lo) * _pick(m & 3, x0, x1, x2)
            acc += _bf16_hi(lo) * _pick(((m >> 2) & 3) - 1, x1, x2, x3)
            acc += _bf16_lo(hi) * _pick((m >> 4) & 3, x4, x5, x6)
            acc += _bf16_hi(hi) * _pick((m >> 6) - 1, x5, x6, x7)
        out = tl.sum(acc, axis=1)
        tl.store(c_ptr + pair.to(tl.int64) * stride_cm + offs_n, out.to(c_ptr.dtype.element_ty), mask=n_ok)


decode_kernel = triton.autotune(configs=autotune_candidates(CONFIGS), key=["N", "K", "BLOCK_M", "rows_bucket"])(
    triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(sparse24_decode_kernel)
)


def launch_decode(
    a,
    values,
    meta,
    sorted_ids,
    block_expert,
    rows_per_a: int,
    block_m: int,
    rows_bucket: int,
    *,
    wrap: bool = False,
    config: triton.Config | None = None,
):
    """``out[s] = a[s // rows_per_a] @ W[expert(s)].T`` on the CUDA cores (see the module docstring)."""
    num_experts, n, half_k = (int(d) for d in values.shape)  # static: EVEN_N is a constant (launch_grouped_mm)
    k = half_k * 2
    n_pairs = a.shape[0] * rows_per_a
    words = values.view(torch.int64)  # [E, N, K/8]: 4 bf16 values per word
    units = a.view(a.shape[0], k // 8, 8).transpose(1, 2).contiguous()  # x[8u + j] at [j, u]
    out = torch.empty((n_pairs, n), dtype=a.dtype, device=a.device)
    args = (
        units,
        words,
        meta,
        sorted_ids,
        block_expert,
        out,
        n,
        k,
        n_pairs,
        rows_per_a,
        rows_bucket,
        units.stride(0),
        units.stride(1),
        words.stride(0),
        words.stride(1),
        meta.stride(0),
        meta.stride(1),
        out.stride(0),
    )
    if config is None:
        kernel = decode_kernel
        grid = lambda meta_: (block_expert.numel(), triton.cdiv(n, meta_["BLOCK_N"]))  # noqa: E731
        extra = {}
    else:
        kernel = sparse24_decode_kernel
        grid = (block_expert.numel(), triton.cdiv(n, config.kwargs["BLOCK_N"]))
        extra = dict(
            config.kwargs,
            EVEN_N=n % config.kwargs["BLOCK_N"] == 0,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    if wrap:
        kernel = torch.library.wrap_triton(kernel)
    kernel[grid](*args, BLOCK_M=block_m, **extra)
    return out
