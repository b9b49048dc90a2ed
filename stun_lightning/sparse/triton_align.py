"""One Triton program that groups a decode step's (token, expert) pairs by expert.

:func:`.experts.align_pairs` in torch ops is a sort, a scatter-add, a cumsum, a searchsorted and a
few elementwise kernels: at decode, where the expert products take tens of microseconds, those
launches are a large share of an MoE layer. For up to :data:`MAX_PAIRS` pairs this kernel computes
the same two tensors in one launch: per-expert counts by a histogram and the stable rank of each
pair among its expert's pairs from pairwise comparisons in registers, padded offsets by a
cumulative sum, then the sentinel fill and the scatter of pair ids (separated by a block barrier).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: largest number of pairs (tokens x top_k) aligned by the one-program kernel (a decode batch of 32
#: tokens at top-8); larger calls use the torch ops
MAX_PAIRS = 256


@triton.jit
def align_kernel(flat_ptr, ids_ptr, be_ptr, n_pairs, num_experts, n_blocks,
                 BLOCK_M: tl.constexpr, P: tl.constexpr, E: tl.constexpr, B: tl.constexpr, FILL: tl.constexpr, CHUNK: tl.constexpr):
    """One program; ``P``, ``E``, ``B``: powers of two covering the pairs, experts and blocks. Counts
    by a histogram, each pair's expert start by a gather, and the pairwise comparisons ``CHUNK``
    columns (earlier pairs) or rows (blocks) at a time, so that no [P, P], [P, E] or [B, E] tile
    sits in registers at once (at 256 pairs and 128 experts those spilled: 34 us on an H100;
    benchmarks/layer_profile.py)."""
    s = tl.arange(0, P)
    ok = s < n_pairs
    ex = tl.load(flat_ptr + s, mask=ok, other=0).to(tl.int32)
    counts = tl.histogram(ex, E, mask=ok)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    start = padded_end - padded
    experts = tl.arange(0, E)
    rank = tl.zeros((P,), tl.int32)
    for j0 in tl.static_range(0, P, CHUNK):  # how many earlier pairs chose the same expert
        sj = j0 + tl.arange(0, CHUNK)
        exj = tl.load(flat_ptr + sj, mask=sj < n_pairs, other=-2).to(tl.int32)
        earlier_same = (ex[:, None] == exj[None, :]) & (sj[None, :] < s[:, None])  # [P, CHUNK]
        rank += tl.sum(earlier_same.to(tl.int32), axis=1)
    position = tl.gather(start, ex, 0) + rank
    # every slot first holds the sentinel, then the pairs overwrite theirs
    slots = tl.arange(0, FILL)
    for f0 in range(0, n_blocks * BLOCK_M, FILL):
        tl.store(ids_ptr + f0 + slots, tl.full((FILL,), 0, tl.int32) + n_pairs, mask=f0 + slots < n_blocks * BLOCK_M)
    tl.debug_barrier()
    tl.store(ids_ptr + position, s, mask=ok)
    # block b's expert: how many experts end at or before its first slot (searchsorted, right)
    for b0 in tl.static_range(0, B, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        ended = (padded_end[None, :] <= (b * BLOCK_M)[:, None]) & (experts[None, :] < num_experts)  # [CHUNK, E]
        expert = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(be_ptr + b, tl.where(expert < num_experts, expert, -1), mask=b < n_blocks)


def fits(n_pairs: int) -> bool:
    return 0 < n_pairs <= MAX_PAIRS


def launch_align(flat: torch.Tensor, num_experts: int, block_m: int, *, wrap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_ids, block_expert)`` as :func:`.experts.align_pairs` returns them, for a flat
    ``[n_pairs]`` expert index on a CUDA device."""
    n_pairs = flat.numel()
    if not fits(n_pairs):
        raise ValueError(f"the one-program align kernel takes 1..{MAX_PAIRS} pairs, got {n_pairs}")
    n_blocks = -(-n_pairs // block_m) + min(num_experts, n_pairs)
    sorted_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=flat.device)
    kernel = torch.library.wrap_triton(align_kernel) if wrap else align_kernel
    chunk = min(32, triton.next_power_of_2(n_pairs))
    kernel[(1,)](flat.contiguous(), sorted_ids, block_expert, n_pairs, num_experts, n_blocks, BLOCK_M=block_m,
                 P=triton.next_power_of_2(n_pairs), E=triton.next_power_of_2(num_experts),
                 B=max(chunk, triton.next_power_of_2(n_blocks)), FILL=min(1024, triton.next_power_of_2(n_blocks * block_m)),
                 CHUNK=chunk, num_warps=8 if n_pairs * num_experts > 4096 else 4)
    return sorted_ids, block_expert
