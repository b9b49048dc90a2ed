"""The sparse tensor cores: ``mma.sp`` and Hopper's sparse ``wgmma`` over our 2:4 layout, compiled at
run time by NVRTC.

Triton exposes no sparse tensor-core instruction, so :mod:`.triton_kernel` and :mod:`.triton_decode`
expand the weights or multiply on the CUDA cores. The kernels here (sources: ``cuda_mma.cu`` and
``cuda_wgmma.cu`` beside this file) give the compressed values and metadata to the sparse
instructions as they are stored (:mod:`.format`), weight rows as the sparse operand and routed
tokens as the dense one:

* decode (:func:`mma_sp_grouped_mm`, op ``stun::sparse24_mma``): ``mma.sp.m16n8k32`` on blocks of 16
  pairs of one expert (:func:`..experts.block_m_for` gives 16 while experts see at most 16 tokens),
  fragments loaded straight from global memory (the activations permuted to match, a view and a
  transpose that torch.compile fuses), split-K when few experts are routed. A decode step streams
  0.5625 of the dense bytes with no expansion work.
* prefill (op ``stun::sparse24_mma_tile``), blocks of 128 pairs: on a Hopper GPU
  (:func:`wgmma_grouped_mm`, sm_90a) ``wgmma.mma_async.sp.m64n128k32`` with the activations read by
  the tensor cores from a swizzled shared-memory tile, warp-specialized (one producer warpgroup
  copying with ``cp.async`` into an mbarrier pipeline, two warpgroups multiplying 128 weight rows
  each); elsewhere (:func:`tile_grouped_mm`, sm_80+) a 128 or 256 x 128 tile on ``mma.sp``, whose
  peak (917 dense-equivalent TFLOP/s on an H100 against 774 for cuBLAS, ``benchmarks/investigations/mma_rates.py``)
  leaves it slower than a dense prefill.

They serve bf16 weights whose dimensions fit (:func:`fits`, :func:`fits_tile`). Each is compiled
once per device with ``torch.cuda._compile_kernel`` (NVRTC, shipped with torch's CUDA wheels;
nothing to build at install) and launched on the current stream through ``cuLaunchKernel``
(:func:`.cuda_driver.launch_kernel`), so CUDA graphs capture them; as torch ops (:func:`_cuda_op`) with fake
kernels torch.compile keeps each as one opaque call (no graph break). AOTInductor packages cannot hold a
Python-launched kernel, so :func:`disabled` turns them off while exporting and the Triton kernels
serve instead; ``STUN_SPARSE_MMA=0`` turns them all off, ``STUN_SPARSE_WGMMA=0`` only the Hopper one.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .cuda_compile import (  # noqa: F401  (_compile, _stage_bytes: re-exported from their old module)
    ROWS_PER_WARP,
    TILE_PAIRS,
    TILE_ROWS,
    TILE_STAGES,
    UNROLL,
    WARPS,
    _capability,
    _compile,
    _device_index,
    _kernel,
    _stage_bytes,
    _tile_kernel,
    _wgmma_kernel,
    multiprocessors,
    tile_smem_bytes,
    wgmma_smem_bytes,
)
from .cuda_driver import launch_kernel
from .op_library import _LIBRARY, _cuda_op  # noqa: F401

#: tokens per block of pairs that one CTA multiplies (two n8 tiles)
BLOCK_M = 16
#: CTAs wanted per multiprocessor before the input dimension is split across CTAs
CTAS_PER_SM = 4

_enabled = os.environ.get("STUN_SPARSE_MMA", "1") != "0"
#: the Hopper prefill kernel (sparse ``wgmma``); ``STUN_SPARSE_WGMMA=0`` keeps ``mma.sp`` there
_enabled_wgmma = os.environ.get("STUN_SPARSE_WGMMA", "1") != "0"
#: its launch by tile height (weight rows): 256 rows where the outputs divide, warp-specialized,
#: else 128 (the fastest of each on an H100: benchmarks/results/sparse_kernels_h100.md)
WGMMA_LAUNCHES = {256: dict(rows=256, stages=4, consumers=2), 128: dict(rows=128, stages=3, ctas=2, consumers=0)}
#: the CTA order: grid order (0). Groups of 4 blocks were faster on uniformly routed Qwen3 shapes
#: (gate_up 320 vs 336 us, down 208 vs 230 us) but slower on Mixtral (1988 vs 1886 us) and on a
#: whole model whose second layer routes unevenly (an expert's weights are then read once per group
#: of its blocks: Qwen3 model prefill 0.80x dense, 1.10x in grid order); expert by expert (a CTA
#: table built per call) was slower on both layer shapes (1943, 374 us):
#: benchmarks/results/sparse_kernels_h100.md, inference_h100.md
WGMMA_GROUP = 0
#: pairs per routed expert from which prefill runs it (Qwen3-30B shapes at 2048 tokens: 128)
WGMMA_MIN_PAIRS_PER_EXPERT = 128
#: largest activation matrix (elements) of the warp-specialized kernel, whose producer keeps 32-bit
#: offsets into it; larger ones (from about 150k rows of 14336 inputs) take the Triton kernel
MAX_ACT_ELEMENTS = 2**31 - 1


@contextlib.contextmanager
def disabled():
    """Run the Triton kernels instead inside this block (AOTInductor export, comparisons)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def fits(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, block_m: int) -> bool:
    """Whether the decode kernel takes the call: CUDA, bf16, inputs % 64 == 0, outputs % 16 == 0,
    blocks of 16 pairs, and the kernel ready on that GPU (sm_80+, NVRTC found); ``STUN_SPARSE_MMA=0``
    or :func:`disabled` turn it off."""
    return _shapes_fit(a, values, meta, block_m, BLOCK_M, ROWS_PER_WARP) and kernel_ready(
        _device_index(a.device), "decode"
    )


def _shapes_fit(a, values, meta, block_m: int, want_block_m: int, row_multiple: int) -> bool:
    if not (_enabled and a.is_cuda and block_m == want_block_m and a.dtype == values.dtype == torch.bfloat16):
        return False
    n, half_k = values.shape[1:]
    return (2 * half_k) % 64 == 0 and n % row_multiple == 0 and values.is_contiguous() and meta.is_contiguous()


@torch._dynamo.assume_constant_result
def kernel_ready(device_index: int, kernel: str) -> bool:
    """The GPU is sm_80+ and the ``"decode"`` or ``"tile"`` kernel compiled for it, or (``"wgmma"``)
    a Hopper with its prefill kernel (a constant while torch.compile traces)."""
    if kernel == "wgmma":
        return hopper_ready(device_index)
    compiled = _kernel if kernel == "decode" else _tile_kernel
    return _capability(device_index) >= (8, 0) and compiled(device_index) is not None


def hopper_ready(device_index: int) -> bool:
    """The GPU is a Hopper (compute capability 9.0) and the ``wgmma`` prefill kernel compiled for it."""
    if not (_enabled_wgmma and _capability(device_index) == (9, 0)):
        return False
    launch = WGMMA_LAUNCHES[256]  # the default launch, the one prefill compiles first
    return _wgmma_kernel(device_index, launch["rows"], launch["stages"], 1, launch["consumers"]) is not None


def splits_for(
    n: int,
    k: int,
    touched: int,
    device: torch.device,
    warps: int = WARPS,
    unroll: int = UNROLL,
    ctas_per_sm: int = CTAS_PER_SM,
) -> int:
    """How many CTAs share the input dimension: enough CTAs for ``ctas_per_sm`` per multiprocessor
    when only ``touched`` experts are routed (Mixtral down_proj at 8 tokens: 8 x 64 row tiles);
    every split gets whole iterations of ``unroll`` steps of 64 inputs."""
    ctas = touched * (-(-n // (ROWS_PER_WARP * warps)))
    iterations = -(-(k // 64) // unroll)
    wanted = max(1, min(iterations, -(-ctas_per_sm * multiprocessors(_device_index(device)) // ctas)))
    per_split = -(-iterations // wanted)
    return -(-iterations // per_split)


def permute_activations(a: torch.Tensor) -> torch.Tensor:
    """``a`` ``[M, K]`` with each 64-input step reordered as the decode kernel's B fragments read it:
    lane ``t``'s fragment of mma ``m`` is then the 8 values at ``[32 m + 8 t, 32 m + 8 t + 8)``.

    That lane holds the mma's inputs ``2t + {0, 1} + 8 r`` (``r`` = 0..3), i.e. group
    ``j = (2t + 8r) // 4`` at offset ``2 (t % 2)``; the mma's group ``j < 4`` is our group
    ``4 j + 2 m``, its group ``j >= 4`` our ``4 (j - 4) + 2 m + 1`` (how lanes load the weights). The
    order is a permutation of the 6 index bits, so this is a view and a transpose, which
    torch.compile fuses into the op that produces ``a`` (``tests/test_sparse_mma.py`` checks it
    against the rule above)."""
    m, k = a.shape
    bits = a.reshape(m, k // 64, 2, 2, 2, 2, 2, 2)  # input bits 5..0 of each step
    return bits.permute(0, 1, 4, 3, 6, 5, 2, 7).reshape(m, k)


@_cuda_op
def sparse24_mma(
    act: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    rows_per_a: int,
    splits: int,
) -> torch.Tensor:
    """Products of :func:`mma_sp_grouped_mm`: ``[n_pairs, N]`` bf16 for one split, else ``[splits, n_pairs,
    N]`` float32 partial sums. ``act`` = :func:`permute_activations` of the activations."""
    return _launch(act, values, meta, sorted_ids, block_expert, rows_per_a, splits, WARPS, UNROLL)


def _launch(
    act, values, meta, sorted_ids, block_expert, rows_per_a: int, splits: int, warps: int, unroll: int
) -> torch.Tensor:
    num_experts, n, half_k = values.shape
    k = 2 * half_k
    n_pairs = act.shape[0] * rows_per_a
    iterations = -(-(k // 64) // unroll)
    per_split = -(-iterations // splits) * unroll
    if splits == 1:
        out = torch.empty(n_pairs, n, dtype=act.dtype, device=act.device)
    else:
        out = torch.empty(splits, n_pairs, n, dtype=torch.float32, device=act.device)
    kernel = _kernel(act.device.index, warps, unroll)
    if kernel is None:
        raise RuntimeError(
            "the sparse tensor-core kernel did not compile on this GPU (see the warning above); run with STUN_SPARSE_MMA=0"
        )
    grid = (block_expert.numel(), -(-n // (ROWS_PER_WARP * warps)), splits)
    launch_kernel(
        kernel,
        grid,
        (32 * warps, 1, 1),
        0,
        [
            _aligned(values),
            _aligned(meta),
            _aligned(act),
            sorted_ids,
            block_expert,
            out,
            n,
            k,
            n_pairs,
            rows_per_a,
            per_split,
            int(splits > 1),
        ],
    )
    return out


def _aligned(a: torch.Tensor) -> torch.Tensor:
    """``a`` contiguous and starting on a boundary of 8 elements (the kernels load 8 bf16 values or
    8 metadata bytes at a time); a copy only for a view that starts elsewhere."""
    a = a.contiguous()
    return a if a.storage_offset() % 8 == 0 else a.clone()


def mma_sp_grouped_mm(
    a,
    values,
    meta,
    sorted_ids,
    block_expert,
    rows_per_a: int,
    *,
    warps: int = WARPS,
    unroll: int = UNROLL,
    ctas_per_sm: int = CTAS_PER_SM,
) -> torch.Tensor:
    """``out[s] = a[s // rows_per_a] @ W[expert(s)].T`` for every pair ``s`` (blocks of 16 pairs from
    :func:`..experts.align_pairs`) on the sparse tensor cores; ``a`` ``[M, K]`` bf16, returns
    ``[M * rows_per_a, N]``. The launch shape arguments other than the defaults run outside the
    op (``benchmarks/sparse_kernels.py`` times them)."""
    num_experts, n, half_k = values.shape
    splits = splits_for(n, 2 * half_k, min(num_experts, a.shape[0] * rows_per_a), a.device, warps, unroll, ctas_per_sm)
    act = permute_activations(a)
    if (warps, unroll) == (WARPS, UNROLL):
        out = sparse24_mma(act, values, meta, sorted_ids, block_expert, rows_per_a, splits)
    else:
        out = _launch(act, values, meta, sorted_ids, block_expert, rows_per_a, splits, warps, unroll)
    return out if splits == 1 else out.sum(0).to(a.dtype)


#: pairs per routed expert from which prefill runs the tile kernel: with fewer, partly filled blocks
#: of 128 pairs cost it more than the Triton kernel (Qwen3 shapes with 25% of experts removed, 170
#: pairs per expert: layer 0.76x dense against 0.91x; benchmarks/results/inference_h100.md, last section)
TILE_MIN_PAIRS_PER_EXPERT = 256


def fits_tile(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, block_m: int, rows_per_a: int = 1) -> bool:
    """Whether a prefill kernel takes the call: as :func:`fits`, with blocks of 128 pairs, outputs
    % 128 == 0 and at least ``WGMMA_MIN_PAIRS_PER_EXPERT`` (Hopper) or ``TILE_MIN_PAIRS_PER_EXPERT``
    pairs per routed expert."""
    if not _shapes_fit(a, values, meta, block_m, TILE_PAIRS, TILE_ROWS) or a.numel() > MAX_ACT_ELEMENTS:
        return False
    device_index = _device_index(a.device)
    hopper = kernel_ready(device_index, "wgmma")
    n_pairs = a.shape[0] * rows_per_a
    if n_pairs < (WGMMA_MIN_PAIRS_PER_EXPERT if hopper else TILE_MIN_PAIRS_PER_EXPERT) * min(values.shape[0], n_pairs):
        return False
    return hopper or kernel_ready(device_index, "tile")


@_cuda_op
def sparse24_mma_tile(
    a: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    rows_per_a: int,
) -> torch.Tensor:
    """:func:`mma_sp_grouped_mm` for prefill: blocks of 128 pairs (``align_pairs(..., 128)``), one tile of
    weight rows x 128 pairs per CTA, operands staged in shared memory: :func:`wgmma_grouped_mm` on
    a Hopper GPU, else :func:`tile_grouped_mm` (:func:`tile_rows_for`)."""
    if hopper_ready(_device_index(a.device)):
        rows = 256 if values.shape[1] % 256 == 0 else 128
        return wgmma_grouped_mm(
            a, values, meta, sorted_ids, block_expert, rows_per_a, **WGMMA_LAUNCHES[rows], group=WGMMA_GROUP
        )
    return tile_grouped_mm(a, values, meta, sorted_ids, block_expert, rows_per_a, tile_rows_for(values.shape[1]))


def tile_rows_for(n: int) -> int:
    """256 weight rows per tile for narrow outputs (Qwen3 down_proj 264 vs 344 us on an H100; Mixtral
    down_proj within noise), else 128 (Mixtral gate_up 2528 vs 2859 us):
    benchmarks/results/sparse_kernels_h100.md runs 5 and 6."""
    return 256 if n <= 4096 and n % 256 == 0 else TILE_ROWS


def tile_grouped_mm(
    a, values, meta, sorted_ids, block_expert, rows_per_a: int, rows: int = TILE_ROWS, stages: int = TILE_STAGES
) -> torch.Tensor:
    """:func:`sparse24_mma_tile` with the tile height (128 or 256 weight rows) and the pipeline depth
    as arguments."""
    kernel = _tile_kernel(a.device.index, rows, stages)
    if kernel is None:
        raise RuntimeError(
            "the sparse tensor-core prefill kernel did not compile on this GPU (see the warning above); run with STUN_SPARSE_MMA=0"
        )
    return _launch_prefill(
        kernel, rows, rows, tile_smem_bytes(rows, stages), a, values, meta, sorted_ids, block_expert, rows_per_a
    )


def _launch_prefill(
    kernel, rows: int, threads: int, shared_mem: int, a, values, meta, sorted_ids, block_expert, rows_per_a: int, *extra
) -> torch.Tensor:
    """Launch a prefill kernel on a grid of blocks of pairs x tiles of ``rows`` weight rows, with the
    arguments both prefill kernels take (then ``extra``); returns ``[pairs, N]``."""
    num_experts, n, half_k = values.shape
    n_pairs = a.shape[0] * rows_per_a
    out = torch.empty(n_pairs, n, dtype=a.dtype, device=a.device)
    launch_kernel(
        kernel,
        (block_expert.numel(), n // rows, 1),
        (threads, 1, 1),
        shared_mem,
        [
            _aligned(values),
            _aligned(meta),
            _aligned(a),
            sorted_ids,
            block_expert,
            out,
            n,
            2 * half_k,
            n_pairs,
            rows_per_a,
            *extra,
        ],
    )
    return out


def wgmma_grouped_mm(
    a,
    values,
    meta,
    sorted_ids,
    block_expert,
    rows_per_a: int,
    rows: int = 256,
    stages: int = 4,
    ctas: int = 1,
    consumers: int = 2,
    group: int = 0,
) -> torch.Tensor:
    """:func:`sparse24_mma_tile` on a Hopper GPU: the same blocks of 128 pairs through the sparse
    ``wgmma`` (``cuda_wgmma.cu``), ``rows`` (64, 128 or 256) weight rows per CTA; warp-specialized
    with ``consumers`` = 2 multiplying warpgroups, else every warp copies and multiplies. The CTAs
    run ``group`` blocks of pairs at a time over every row tile (0: all blocks, grid order)."""
    if consumers not in (0, 2):
        raise ValueError(f"the warp-specialized kernel runs 2 consumer warpgroups, got {consumers}")
    if consumers and a.numel() > MAX_ACT_ELEMENTS:
        raise ValueError(
            f"the warp-specialized kernel takes activations of at most {MAX_ACT_ELEMENTS} elements, got {a.numel()}"
        )
    n = values.shape[1]
    kernel = _wgmma_kernel(a.device.index, rows, stages, ctas, consumers)
    if kernel is None or n % rows:
        raise RuntimeError(
            f"the Hopper sparse prefill kernel cannot run here ({n} output rows, tiles of {rows}; or it did not compile: "
            "see the warning above); run with STUN_SPARSE_WGMMA=0"
        )
    threads = 128 * consumers + 128 if consumers else 2 * rows
    return _launch_prefill(
        kernel,
        rows,
        threads,
        wgmma_smem_bytes(rows, stages, consumers),
        a,
        values,
        meta,
        sorted_ids,
        block_expert,
        rows_per_a,
        group if group > 0 else block_expert.numel(),
    )


@torch.library.register_fake("stun::sparse24_mma_tile")
def _(a, values, meta, sorted_ids, block_expert, rows_per_a):
    return a.new_empty(a.shape[0] * rows_per_a, values.shape[1])


@torch.library.register_fake("stun::sparse24_mma")
def _(act, values, meta, sorted_ids, block_expert, rows_per_a, splits):
    n_pairs, n = act.shape[0] * rows_per_a, values.shape[1]
    return act.new_empty(n_pairs, n) if splits == 1 else act.new_empty(splits, n_pairs, n, dtype=torch.float32)
