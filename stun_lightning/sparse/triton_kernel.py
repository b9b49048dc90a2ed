"""Triton kernels: grouped matmul of routed tokens with 2:4-compressed expert weights.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``out = A[rows] @ W[e].T`` for one block of
(token, expert) pairs that all chose expert ``e`` (see :func:`..experts.align_pairs`). Per step of
``BLOCK_K`` inputs it streams ``BLOCK_N x BLOCK_K/2`` values and ``BLOCK_N x BLOCK_K/8`` metadata
bytes, the only weight bytes the expert costs (0.5625 of dense bf16). Blocks past the routed
experts exit at once, so the grid has a static size (CUDA graphs) while the work follows the
routing. :func:`launch_grouped_mm` picks one of two kernels:

* decode (:mod:`.triton_decode`): while the routed experts see one token each on average
  (bf16, inputs % 8 == 0), a CUDA-core kernel that multiplies straight from the compressed
  values, with no dense tile;
* tensor cores (here): each step is expanded to a dense ``[BLOCK_N, BLOCK_K]`` tile in registers
  and fed to ``tl.dot``. With ``SWAP`` the program computes ``W @ A.T`` (tile ``[BLOCK_N,
  BLOCK_M]``): the expanded tile is then the left operand, which Hopper's ``wgmma`` reads from
  registers, so it skips the shared-memory round trip, and the token block is the instruction's N
  side (the autotuner chooses; ``benchmarks/results/sparse_kernels_h100.md`` run 3). Prefill still
  runs dense tensor-core math (Triton exposes no sparse ``mma.sp``) and cannot beat a dense kernel.

From 2 to 16 tokens per routed expert, and for prefill from 256, the model runs :mod:`.cuda_mma`
(``mma.sp``) instead where it fits (:func:`..experts.sparse24_dispatch_mm`); the tensor-core kernel here serves
the other sizes, dtypes and shapes, and AOTInductor exports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_decode

#: the CUDA-core decode kernel serves calls whose pairs per touched expert round up to at most
#: this; from two tokens per expert the tensor-core kernel was faster on an H100
#: (benchmarks/results/sparse_kernels_h100.md run 3: Mixtral gate_up at 8 tokens 565 vs 753 us; at
#: one token per expert the decode kernel wins: Mixtral 1 token 117 vs 155 us, Qwen3 8 tokens 102 vs
#: 113 us)
DECODE_MAX_ROWS = 1


def _config(
    block_n: int, block_k: int, warps: int, prefetch: bool = True, stages: int = 1, swap: bool = False
) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_K": block_k, "PREFETCH": prefetch, "SWAP": swap}, num_warps=warps, num_stages=stages
    )


def _swapped(block_n: int, block_k: int, warps: int, stages: int = 3) -> triton.Config:
    return _config(block_n, block_k, warps, prefetch=False, stages=stages, swap=True)


# Candidates checked with Triton 3.6 for sm_90 (BLOCK_N=128 with 4 warps crashes the compiler); the
# autotuner picks per (N, K, BLOCK_M, pairs per expert). num_stages=3 streams the weight tiles
# through shared memory with cp.async; PREFETCH holds the next K step in registers. Swapped
# candidates need BLOCK_N >= 64 (wgmma's M). The decode winner, swapped 64 x 256 with 4 warps,
# spills a few registers (ptxas -v) and was still the fastest from 2 tokens per expert on an H100.
DECODE_CONFIGS = [
    _config(16, 128, 4, prefetch=False, stages=3),
    _config(16, 256, 4, prefetch=False, stages=3),
    _config(32, 128, 8, prefetch=False, stages=3),
    _config(64, 64, 8, prefetch=False, stages=3),
    _config(64, 64, 8),
    _config(32, 128, 8),
    _config(16, 128, 4),
    _swapped(64, 64, 4),
    _swapped(64, 128, 4),
    _swapped(64, 256, 4),
    _swapped(128, 64, 8),
    _swapped(128, 128, 8),
    _swapped(64, 128, 4, stages=4),
    _swapped(64, 128, 8),
]
PREFILL_CONFIGS = [
    _config(64, 64, 8),
    _config(64, 64, 8, prefetch=False, stages=3),
    _config(128, 32, 8, prefetch=False, stages=3),
    _config(128, 64, 8, prefetch=False, stages=3),
    _config(64, 64, 4, prefetch=False, stages=3),
    _config(64, 32, 4, prefetch=False, stages=3),
    _swapped(64, 64, 4),
    _swapped(64, 64, 8),
    _swapped(128, 64, 8),
    _swapped(128, 32, 8),
    _swapped(64, 32, 4),
    _swapped(128, 64, 8, stages=4),
    _swapped(64, 64, 4, stages=4),
]


@triton.jit
def _expand_24(v, m, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense ``[BLOCK_N, BLOCK_K]`` tile from values ``[BLOCK_N, BLOCK_K/2]`` and nibbles ``[BLOCK_N, BLOCK_K/8]``."""
    nib = tl.reshape(tl.join(m & 0xF, m >> 4), (BLOCK_N, BLOCK_K // 4))
    i0 = nib & 3  # 0..2
    i1 = nib >> 2  # 1..3
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
    zero = tl.zeros_like(v0)
    d0 = tl.where(i0 == 0, v0, zero)
    d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    d3 = tl.where(i1 == 3, v1, zero)
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _load_w(
    v_ptrs,
    m_ptrs,
    n_ok,
    offs_v,
    offs_q,
    k0,
    half_k,
    meta_k,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """Values and metadata of the K step starting at input ``k0``."""
    v_ptrs += k0 // 2
    m_ptrs += k0 // 8
    if EVEN_K:
        if EVEN_N:
            v = tl.load(v_ptrs)
            m = tl.load(m_ptrs)
        else:
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            m = tl.load(m_ptrs, mask=n_ok[:, None], other=0)
    else:
        v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_v[None, :] < half_k - k0 // 2), other=0.0)
        m = tl.load(m_ptrs, mask=n_ok[:, None] & (offs_q[None, :] < meta_k - k0 // 8), other=0)
    return v, m


@triton.jit
def _dot(x, y, acc, IEEE: tl.constexpr):
    if IEEE:
        acc = tl.dot(x, y, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, y, acc)
    return acc


@triton.jit
def _step(
    acc,
    a_ptrs,
    valid,
    offs_k,
    k0,
    K,
    v,
    m,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    SWAP: tl.constexpr,
):
    w = _expand_24(v, m, BLOCK_N, BLOCK_K)
    if SWAP:  # acc [BLOCK_N, BLOCK_M] = W @ A.T: the expanded tile is wgmma's register operand
        if EVEN_K:
            a = tl.load(a_ptrs + k0, mask=valid[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs + k0, mask=valid[None, :] & (offs_k[:, None] < K - k0), other=0.0)
        acc = _dot(w, a, acc, IEEE)
    else:
        if EVEN_K:
            a = tl.load(a_ptrs + k0, mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs + k0, mask=valid[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        acc = _dot(a, tl.trans(w), acc, IEEE)
    return acc


@triton.jit
def sparse24_grouped_mm_kernel(
    a_ptr,
    v_ptr,
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
    stride_ve,
    stride_vn,
    stride_me,
    stride_mn,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    PREFETCH: tl.constexpr,
    SWAP: tl.constexpr = False,
):
    """``rows_bucket`` (pairs per touched expert, rounded to a power of two) only keys the autotuner."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(be_ptr + pid_m)
    if e < 0:  # a block past the routed experts
        return
    e = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(ids_ptr + offs_m)
    valid = pair < n_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_q = tl.arange(0, BLOCK_K // 8)
    v_ptrs = v_ptr + e * stride_ve + offs_n[:, None].to(tl.int64) * stride_vn + offs_v[None, :]
    m_ptrs = m_ptr + e * stride_me + offs_n[:, None].to(tl.int64) * stride_mn + offs_q[None, :]
    half_k = K // 2
    meta_k = (K + 7) // 8
    last = (K - 1) // BLOCK_K * BLOCK_K
    row = tl.where(valid, pair // rows_per_a, 0).to(tl.int64)
    if SWAP:
        a_ptrs = a_ptr + row[None, :] * stride_am + offs_k[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH:  # hold the next K step's weight tile in registers while this one is multiplied
        v, m = _load_w(v_ptrs, m_ptrs, n_ok, offs_v, offs_q, 0, half_k, meta_k, BLOCK_K, EVEN_K, EVEN_N)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            v_next, m_next = _load_w(v_ptrs, m_ptrs, n_ok, offs_v, offs_q, k0, half_k, meta_k, BLOCK_K, EVEN_K, EVEN_N)
            acc = _step(acc, a_ptrs, valid, offs_k, k0 - BLOCK_K, K, v, m, BLOCK_N, BLOCK_K, EVEN_K, IEEE, SWAP)
            v = v_next
            m = m_next
        acc = _step(acc, a_ptrs, valid, offs_k, last, K, v, m, BLOCK_N, BLOCK_K, EVEN_K, IEEE, SWAP)
    else:
        for k0 in range(0, K, BLOCK_K):
            v, m = _load_w(v_ptrs, m_ptrs, n_ok, offs_v, offs_q, k0, half_k, meta_k, BLOCK_K, EVEN_K, EVEN_N)
            acc = _step(acc, a_ptrs, valid, offs_k, k0, K, v, m, BLOCK_N, BLOCK_K, EVEN_K, IEEE, SWAP)
    if SWAP:
        c_ptrs = c_ptr + pair[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[None, :] & n_ok[:, None])
    else:
        c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _even(args) -> dict:
    return {"EVEN_K": args["K"] % args["BLOCK_K"] == 0, "EVEN_N": args["N"] % args["BLOCK_N"] == 0}


def _autotuned(configs):
    even = triton.heuristics({"EVEN_K": lambda a: _even(a)["EVEN_K"], "EVEN_N": lambda a: _even(a)["EVEN_N"]})
    return triton.autotune(
        configs=triton_decode.autotune_candidates(configs), key=["N", "K", "BLOCK_M", "rows_bucket"]
    )(even(sparse24_grouped_mm_kernel))


decode_kernel = _autotuned(DECODE_CONFIGS)
prefill_kernel = _autotuned(PREFILL_CONFIGS)


def rows_bucket_for(n_pairs: int, num_experts: int) -> int:
    """Pairs per touched expert, rounded up to a power of two (at most 64): the autotuners' key."""
    return min(64, triton.next_power_of_2(max(1, -(-n_pairs // max(1, min(num_experts, n_pairs))))))


def uses_decode_kernel(values: torch.Tensor, rows_bucket: int, block_m: int) -> bool:
    """Whether :func:`launch_grouped_mm` runs :mod:`.triton_decode` for a call with this
    :func:`rows_bucket_for`."""
    return block_m <= 16 and rows_bucket <= DECODE_MAX_ROWS and triton_decode.fits(values)


def launch_grouped_mm(
    a,
    values,
    meta,
    sorted_ids,
    block_expert,
    rows_per_a: int,
    block_m: int,
    *,
    wrap: bool = False,
    config: dict | triton.Config | None = None,
):
    """Run the decode or the tensor-core kernel; ``config`` (a ``triton.Config`` or a dict with
    ``BLOCK_N``, ``BLOCK_K`` and optional ``PREFETCH``) runs the tensor-core kernel without autotuning."""
    a = a.contiguous()
    # the weights' dimensions are static: ints here (a guard, should a trace have made them
    # symbolic), so that the EVEN_N / EVEN_K heuristics and the grid never hold a symbolic size
    num_experts, n, half_k = (int(d) for d in values.shape)
    k = half_k * 2
    if a.shape[-1] != k:
        raise ValueError(f"activations have {a.shape[-1]} features but the compressed weight has {k} inputs")
    n_pairs = a.shape[0] * rows_per_a
    rows_bucket = rows_bucket_for(n_pairs, num_experts)
    if config is None and uses_decode_kernel(values, rows_bucket, block_m):
        return triton_decode.launch_decode(
            a, values, meta, sorted_ids, block_expert, rows_per_a, block_m, rows_bucket, wrap=wrap
        )
    out = torch.empty((n_pairs, n), dtype=a.dtype, device=a.device)
    n_blocks = block_expert.numel()
    args = (
        a,
        values,
        meta,
        sorted_ids,
        block_expert,
        out,
        n,
        k,
        n_pairs,
        rows_per_a,
        rows_bucket,
        a.stride(0),
        values.stride(0),
        values.stride(1),
        meta.stride(0),
        meta.stride(1),
        out.stride(0),
    )
    ieee = a.dtype == torch.float32
    if config is None:
        kernel = decode_kernel if block_m <= 16 else prefill_kernel
        grid = lambda meta_: (n_blocks, triton.cdiv(n, meta_["BLOCK_N"]))  # noqa: E731
        extra = {}
    else:
        kernel = sparse24_grouped_mm_kernel
        launch = {}
        if isinstance(config, triton.Config):
            launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            config = config.kwargs
        grid = (n_blocks, triton.cdiv(n, config["BLOCK_N"]))
        extra = dict(config, EVEN_K=k % config["BLOCK_K"] == 0, EVEN_N=n % config["BLOCK_N"] == 0, **launch)
        extra.setdefault("PREFETCH", True)
    if wrap:
        kernel = torch.library.wrap_triton(kernel)
    kernel[grid](*args, BLOCK_M=block_m, IEEE=ieee, **extra)
    return out
