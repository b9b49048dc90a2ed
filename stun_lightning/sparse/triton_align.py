"""Triton kernels that group (token, expert) pairs by expert: :func:`.experts.align_pairs` in one launch.

In torch ops that is a sort, a scatter-add, cumsums, a searchsorted and a few elementwise kernels:
at decode, where the expert products take tens of microseconds, those launches are a large share of
an MoE layer, and at prefill the sort alone is about 13 launches (cub's radix sort and its memsets)
whose CPU cost left a compiled Qwen3-shaped layer waiting on the CPU
(``benchmarks/investigations/launch_overhead.py``). Both kernels return the same two tensors as the torch ops,
bit for bit:

* :func:`align_kernel`, one program, up to :data:`MAX_PAIRS` pairs (decode): per-expert counts by a
  histogram and the stable rank of each pair among its expert's pairs from pairwise comparisons in
  registers, padded offsets by a cumulative sum, then the sentinel fill and the scatter of pair ids
  (separated by a block barrier).
* :func:`align_by_expert_kernel`, one program per expert (prefill): each counts every expert's pairs
  (for its start), then writes its own pairs in order by a running cumulative sum, its padding
  slots and its blocks' expert; no atomics, no barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: largest number of pairs (tokens x top_k) aligned by the one-program kernel (a decode batch of 32
#: tokens at top-8); larger calls run one program per expert
MAX_PAIRS = 256
#: pairs per pass of the one-program-per-expert kernel
PREFILL_CHUNK = 2048


@triton.jit
def align_kernel(
    flat_ptr,
    ids_ptr,
    be_ptr,
    n_pairs,
    num_experts,
    n_blocks,
    BLOCK_M: tl.constexpr,
    P: tl.constexpr,
    E: tl.constexpr,
    B: tl.constexpr,
    FILL: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program; ``P``, ``E``, ``B``: powers of two covering the pairs, experts and blocks. Counts
    by a histogram, each pair's expert start by a gather, and the pairwise comparisons ``CHUNK``
    columns (earlier pairs) or rows (blocks) at a time, so that no [P, P], [P, E] or [B, E] tile
    sits in registers at once (at 256 pairs and 128 experts those spilled: 34 us on an H100;
    benchmarks/investigations/layer_profile.py)."""
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


@triton.jit
def align_by_expert_kernel(
    flat_ptr,
    ids_ptr,
    be_ptr,
    n_pairs,
    num_experts,
    n_blocks,
    BLOCK_M: tl.constexpr,
    E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program ``e`` (one per expert): two passes over the pairs, ``CHUNK`` at a time: the counts of
    every expert (a histogram; ``E`` a power of two covering the experts) give its first slot,
    then its pairs go there in pair order (rank = running cumulative sum of the matches). It also
    fills its padding slots with the sentinel and gives its blocks their expert; the slots and
    blocks past the last expert's (the static tail) are shared out over the programs."""
    e = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros((E,), tl.int32)
    for c0 in range(0, n_pairs, CHUNK):
        s = c0 + offs
        counts += tl.histogram(tl.load(flat_ptr + s, mask=s < n_pairs, other=0).to(tl.int32), E, mask=s < n_pairs)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    experts = tl.arange(0, E)
    start = tl.sum(tl.where(experts < e, padded, 0), axis=0)
    count = tl.sum(tl.where(experts == e, counts, 0), axis=0)
    end = start + tl.sum(tl.where(experts == e, padded, 0), axis=0)
    if count > 0:
        seen = start
        for c0 in range(0, n_pairs, CHUNK):
            s = c0 + offs
            mine = tl.load(flat_ptr + s, mask=s < n_pairs, other=-1).to(tl.int32) == e
            rank = tl.cumsum(mine.to(tl.int32), axis=0)
            tl.store(ids_ptr + seen + rank - 1, s, mask=mine)
            seen += tl.sum(mine.to(tl.int32), axis=0)
        pad = start + count + tl.arange(0, BLOCK_M)
        tl.store(ids_ptr + pad, tl.full((BLOCK_M,), 0, tl.int32) + n_pairs, mask=pad < end)
        for b0 in range(start // BLOCK_M, end // BLOCK_M, CHUNK):
            b = b0 + offs
            tl.store(be_ptr + b, tl.full((CHUNK,), 0, tl.int32) + e, mask=b < end // BLOCK_M)
    total = tl.sum(padded, axis=0)
    stride = num_experts * CHUNK
    for f0 in range(total + e * CHUNK, n_blocks * BLOCK_M, stride):
        f = f0 + offs
        tl.store(ids_ptr + f, tl.full((CHUNK,), 0, tl.int32) + n_pairs, mask=f < n_blocks * BLOCK_M)
    for b0 in range(total // BLOCK_M + e * CHUNK, n_blocks, stride):
        b = b0 + offs
        tl.store(be_ptr + b, tl.full((CHUNK,), -1, tl.int32), mask=b < n_blocks)


def fits(n_pairs: int) -> bool:
    """Whether the one-program (decode) kernel takes ``n_pairs`` pairs."""
    return 0 < n_pairs <= MAX_PAIRS


def launch_align(
    flat: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    wrap: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_ids, block_expert)`` as :func:`.experts.align_pairs` returns them, for a flat
    ``[n_pairs]`` expert index on a CUDA device: the one-program kernel up to :data:`MAX_PAIRS`
    pairs, else one program per expert. ``out``: contiguous int32 tensors of those lengths to write."""
    n_pairs = flat.numel()
    if n_pairs == 0:
        raise ValueError("no (token, expert) pairs to align")
    n_blocks = -(-n_pairs // block_m) + min(num_experts, n_pairs)
    if out is None:
        sorted_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=flat.device)
        block_expert = torch.empty(n_blocks, dtype=torch.int32, device=flat.device)
    else:
        sorted_ids, block_expert = out
        if sorted_ids.numel() != n_blocks * block_m or block_expert.numel() != n_blocks:
            raise ValueError(
                f"out holds {sorted_ids.numel()} ids and {block_expert.numel()} blocks; this layout needs {n_blocks * block_m} and {n_blocks}"
            )
    if not fits(n_pairs):
        kernel = torch.library.wrap_triton(align_by_expert_kernel) if wrap else align_by_expert_kernel
        kernel[(num_experts,)](
            flat.contiguous(),
            sorted_ids,
            block_expert,
            n_pairs,
            num_experts,
            n_blocks,
            BLOCK_M=block_m,
            E=triton.next_power_of_2(num_experts),
            CHUNK=PREFILL_CHUNK,
            num_warps=8,
        )
        return sorted_ids, block_expert
    kernel = torch.library.wrap_triton(align_kernel) if wrap else align_kernel
    chunk = min(32, triton.next_power_of_2(n_pairs))
    kernel[(1,)](
        flat.contiguous(),
        sorted_ids,
        block_expert,
        n_pairs,
        num_experts,
        n_blocks,
        BLOCK_M=block_m,
        P=triton.next_power_of_2(n_pairs),
        E=triton.next_power_of_2(num_experts),
        B=max(chunk, triton.next_power_of_2(n_blocks)),
        FILL=min(1024, triton.next_power_of_2(n_blocks * block_m)),
        CHUNK=chunk,
        num_warps=8 if n_pairs * num_experts > 4096 else 4,
    )
    return sorted_ids, block_expert
